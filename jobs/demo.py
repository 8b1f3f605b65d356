"""`make demo`: run every paddock stage that exists today on the tiny configs, in order.

Today that is the tiny world and the tokenizer; training stages join as they land (see README's status table).
"""

import sys
import time

from paddock import tokenizer, world
from paddock.config import TokenizerJob, WorldJob, load_config, paddock_home

STAGES = [
    ("world", WorldJob, "jobs/configs/tiny/world.yaml", world.run),
    ("tokenizer", TokenizerJob, "jobs/configs/tiny/tokenizer.yaml", tokenizer.run),
]

if __name__ == "__main__":
    print(f"paddock demo: stages {', '.join(s[0] for s in STAGES)} (PADDOCK_HOME={paddock_home()})")
    print("Training stages (pretrain, SFT, reward models, RS, PPO, GAtt, serving) are not built yet.\n")
    for name, job, path, run in STAGES:
        start = time.monotonic()
        print(f"== {name} ({path})", flush=True)
        run(load_config(job, path))
        print(f"== {name} done in {time.monotonic() - start:.1f}s\n", flush=True)
    sys.exit(0)
