"""Serve a promoted model (OpenAI-compatible chat + reward endpoints) until Ctrl-C.

python jobs/serve.py [--model NAME] [--alias champion] [--host 127.0.0.1] [--port 8000]
"""

import sys

from paddock.serving.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
