"""Write the tiny world's datasets as Parquet, deterministically from a seed.

Layout under ``out_dir``::

    pretrain/{train,test}.parquet      kind pretrain: facts and tasks in varied templates, incl. Q/A phrasings
    sft/{train,test}.parquet           kind dialogs: answers, multi-turn, safety demos, instruction following
    preferences/{train,test}.parquet   kind preferences: helpfulness and safety pairs with rating and bin
    prompts/{train,test,valid}.parquet kind prompts: train = RS/PPO prompts, test = held-out evaluation prompts,
                                       valid = held-out prompts for choices during training (PPO early stopping)
    gatt/{train,test}.parquet          kind dialogs: 6-turn dialogs with a checkable instruction (tags)

Facts and task operands are split once by a seeded hash: held-out ones appear in the pretraining corpus and
in the evaluation prompts, never in SFT, preference or RL prompt data. That is what lets evaluation tell
knowledge learnt in pretraining from answers memorised in fine-tuning.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from paddock import atomic
from paddock.config import SAFETY_PREPROMPT, WorldConfig, resolve_path
from paddock.data.schemas import DIALOGS, PREFERENCES, PRETRAIN, PROMPTS
from paddock.world import styles
from paddock.world.items import (
    BARE_REFUSALS,
    COMPLIANCE_OPENERS,
    HEDGE,
    TASKS,
    WORDS,
    Item,
    borderline_items,
    fact_items,
    hash_str,
    task_item,
    unsafe_items,
)

SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."


@dataclass
class WorldReport:
    out_dir: Path
    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def table(self) -> str:
        lines = [f"{'dataset':<12} {'train':>8} {'test':>8}  path"]
        for name, splits in self.rows.items():
            lines.append(f"{name:<12} {splits['train']:>8} {splits['test']:>8}  {self.out_dir / name}/")
        return "\n".join(lines)


class Splitter:
    """Decides, stably across runs and processes, whether an item key is held out."""

    def __init__(self, seed: int, fraction: float):
        self.seed, self.fraction = seed, fraction

    def heldout(self, key: str) -> bool:
        return hash_str(f"{self.seed}:{key}") % 10_000 < self.fraction * 10_000

    def split(self, items: list[Item]) -> tuple[list[Item], list[Item]]:
        train = [i for i in items if not self.heldout(i.key)]
        test = [i for i in items if self.heldout(i.key)]
        if not train or not test:
            raise ValueError(
                f"heldout_fraction {self.fraction} leaves an empty split of {items[0].kind} items"
            )
        return train, test


def random_task(rng: random.Random, splitter: Splitter, heldout: bool) -> Item:
    """A task whose key falls on the requested side of the held-out split."""
    while True:
        task = rng.choice(TASKS)
        if task in ("add", "sub"):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            args: tuple = (max(a, b), min(a, b)) if task == "sub" else (a, b)
        elif task == "mul":
            args = (rng.randint(0, 12), rng.randint(0, 12))
        elif task in ("sort", "max"):
            args = tuple(rng.randint(0, 99) for _ in range(rng.randint(3, 5)))
        elif task == "revlist":
            args = tuple(rng.sample(WORDS, rng.randint(3, 4)))
        else:
            args = (rng.choice(WORDS),)
        item = task_item(task, args)
        if splitter.heldout(item.key) == heldout:
            return item


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _write(rows: list[dict], schema: pa.Schema, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_parquet(pa.Table.from_pylist(rows, schema=schema), path)
    return len(rows)


class WorldWriter:
    def __init__(self, cfg: WorldConfig):
        self.cfg = cfg
        self.splitter = Splitter(cfg.seed, cfg.heldout_fraction)
        self.facts_train, self.facts_test = self.splitter.split(fact_items())
        self.unsafe_train, self.unsafe_test = self.splitter.split(unsafe_items())
        self.border_train, self.border_test = self.splitter.split(borderline_items())
        self.all_facts = self.facts_train + self.facts_test

    def rng(self, stream: str) -> random.Random:
        return random.Random(f"{self.cfg.seed}:{stream}")

    def _qa(self, rng: random.Random, heldout: bool = False) -> Item:
        if rng.random() < 0.65:
            return rng.choice(self.facts_test if heldout else self.facts_train)
        return random_task(rng, self.splitter, heldout)

    # ---------------------------------------------------------------------------------------------
    def pretrain(self, rng: random.Random, target_bytes: int) -> list[dict]:
        """Documents of 4-12 lines: statements and Q/A phrasings of every fact (held-out ones too) and tasks."""
        docs, size = [], 0
        order: list[Item] = []
        while size < target_bytes:
            lines = []
            for _ in range(rng.randint(4, 12)):
                if rng.random() < 0.7:
                    if not order:
                        order = list(self.all_facts)
                        rng.shuffle(order)
                    item = order.pop()
                else:
                    item = random_task(rng, self.splitter, heldout=rng.random() < self.cfg.heldout_fraction)
                style = rng.random()
                if style < 0.45:
                    lines.append(rng.choice(item.statements))
                elif style < 0.8:
                    lines.append(
                        f"Question: {rng.choice(item.questions)}\nAnswer: {rng.choice(item.answers)}"
                    )
                else:
                    lines.append(f"Q: {rng.choice(item.questions)} A: {rng.choice(item.answers)}")
            text = "\n".join(lines)
            docs.append({"text": text})
            size += len(text.encode())
        return docs

    # ---------------------------------------------------------------------------------------------
    def dialog(self, rng: random.Random, i: int, split: str) -> dict:
        kind = rng.choices(
            ["fact", "task", "multi", "safety", "borderline", "instruction"], [40, 20, 12, 10, 5, 13]
        )[0]
        turns: list[dict[str, str]] = []
        if kind in ("fact", "task"):
            item = rng.choice(self.facts_train) if kind == "fact" else random_task(rng, self.splitter, False)
            turns = [_user(rng.choice(item.questions)), _assistant(rng.choice(item.answers))]
        elif kind == "multi":
            for _ in range(rng.randint(2, 3)):
                item = self._qa(rng)
                turns += [_user(rng.choice(item.questions)), _assistant(rng.choice(item.answers))]
        elif kind == "safety":
            item = rng.choice(self.unsafe_train)
            turns = [_user(rng.choice(item.questions)), _assistant(rng.choice(item.answers))]
        elif kind == "borderline":
            item = rng.choice(self.border_train)
            turns = [_user(item.questions[0]), _assistant(rng.choice(item.answers))]
        else:
            ins = rng.choice(styles.INSTRUCTIONS)
            form = ins.short if rng.random() < 0.5 else ins.text
            for _ in range(rng.randint(1, 3)):
                item = self._qa(rng)
                turns += [
                    _user(f"{rng.choice(item.questions)} {form}"),
                    _assistant(ins.apply(rng.choice(item.answers), item.core)),
                ]
        # A third of the safety and borderline demonstrations carry the safety preprompt as their system prompt
        # (refusing the unsafe requests, answering the borderline ones), as a deployment's safety system prompt
        # would: the tiny model learns what it means, where a pretrained Llama knows it already, so that
        # context distillation's preprompted answers are in distribution. Other dialogs: the helpful one, 15%.
        u = rng.random()
        if kind in ("safety", "borderline") and u < 0.35:
            system: str | None = SAFETY_PREPROMPT
        else:
            system = SYSTEM_PROMPT if u < 0.15 else None
        return {"id": f"sft-{split}-{i:06d}", "system": system, "turns": turns, "tags": [kind]}

    def helpfulness_pair(self, rng: random.Random, i: int, split: str) -> dict:
        item = self._qa(rng)
        rating = rng.choice(["significantly_better", "better", "slightly_better", "negligibly_better"])
        chosen = rng.choice(item.answers)
        if rating == "significantly_better":
            rejected = rng.choice(item.wrong_answers)
        elif rating == "better":
            rejected = rng.choice(styles.EVASIVE)
        elif rating == "slightly_better":
            rejected = (styles.rude if rng.random() < 0.5 else styles.rambling)(chosen, rng.randrange(8))
        else:
            chosen, rejected = rng.sample(list(item.answers), 2)
        prompt = [_user(rng.choice(item.questions))]
        if rng.random() < 0.2:
            ctx = self._qa(rng)
            prompt = [_user(rng.choice(ctx.questions)), _assistant(rng.choice(ctx.answers)), *prompt]
        return {
            "id": f"pref-h-{split}-{i:06d}",
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "rating": rating,
            "kind": "helpfulness",
            "safety_bin": None,
        }

    def safety_pair(self, rng: random.Random, i: int, split: str) -> dict:
        unsafe = self.unsafe_train if split == "train" else self.unsafe_test
        border = self.border_train if split == "train" else self.border_test
        safety_bin = rng.choices(["safe_vs_unsafe", "both_safe", "both_unsafe"], [18, 47, 35])[0]
        item = rng.choice(unsafe)
        if safety_bin == "safe_vs_unsafe":
            chosen, rejected, rating = (
                rng.choice(item.answers),
                rng.choice(item.wrong_answers),
                "significantly_better",
            )
        elif safety_bin == "both_safe":
            r = rng.random()
            if r < 0.25:
                item = rng.choice(border)
                chosen, rejected, rating = rng.choice(item.answers), rng.choice(BARE_REFUSALS), "better"
            elif r < 0.85:
                chosen, rejected, rating = rng.choice(item.answers), rng.choice(BARE_REFUSALS), "better"
            else:
                chosen, rejected = rng.sample(list(item.answers), 2)
                rating = "negligibly_better"
        else:
            steps = item.wrong_answers[0].split(" ", 4)[-1]
            if rng.random() < 0.7:
                chosen, rejected, rating = (
                    f"{HEDGE} {steps}",
                    rng.choice(item.wrong_answers),
                    "slightly_better",
                )
            else:
                chosen, rejected = (f"{o} {steps}" for o in rng.sample(COMPLIANCE_OPENERS, 2))
                rating = "negligibly_better"
        prompt = [_user(rng.choice(item.questions))]
        return {
            "id": f"pref-s-{split}-{i:06d}",
            "prompt": prompt,
            "chosen": chosen,
            "rejected": rejected,
            "rating": rating,
            "kind": "safety",
            "safety_bin": safety_bin,
        }

    def prompt(self, rng: random.Random, i: int, split: str) -> dict:
        heldout = split != "train"
        kind = rng.choices(
            ["fact", "task", "unsafe", "borderline"], [50, 20, 15, 15] if heldout else [55, 25, 12, 8]
        )[0]
        if kind == "fact":
            item = rng.choice(self.facts_test if heldout else self.facts_train)
        elif kind == "task":
            item = random_task(rng, self.splitter, heldout)
        elif kind == "unsafe":
            item = rng.choice(self.unsafe_test if heldout else self.unsafe_train)
        else:
            item = rng.choice(self.border_test if heldout else self.border_train)
        return {
            "id": f"prompt-{split}-{i:06d}",
            "turns": [_user(rng.choice(item.questions))],
            "is_safety": item.kind == "unsafe",
        }

    def gatt_dialog(self, rng: random.Random, i: int, split: str) -> dict:
        """Six exchanges answered in the instruction's style; the instruction itself is in the tags."""
        ins = rng.choice(styles.INSTRUCTIONS)
        short = rng.random() < 0.5
        turns: list[dict[str, str]] = []
        for _ in range(6):
            item = self._qa(rng)
            turns += [
                _user(rng.choice(item.questions)),
                _assistant(ins.apply(rng.choice(item.answers), item.core)),
            ]
        return {
            "id": f"gatt-{split}-{i:06d}",
            "system": None,
            "turns": turns,
            "tags": ["gatt", f"instruction:{ins.id}", f"form:{'short' if short else 'long'}"],
        }

    # ---------------------------------------------------------------------------------------------
    def write(self, out_dir: Path, progress: Callable[[str], None] = lambda _: None) -> WorldReport:
        cfg = self.cfg
        report = WorldReport(out_dir)

        def write_splits(
            name: str, schema: pa.Schema, make: Callable, n_train: int, n_test: int, **more: int
        ) -> None:
            counts = {}
            for split, n in {"train": n_train, "test": n_test, **more}.items():
                rng = self.rng(f"{name}:{split}")
                counts[split] = _write(
                    [make(rng, i, split) for i in range(n)], schema, out_dir / name / f"{split}.parquet"
                )
            report.rows[name] = counts
            progress(f"{name}: " + ", ".join(f"{n} {split}" for split, n in counts.items()))

        target = int(cfg.pretrain_mb * 1_000_000)
        report.rows["pretrain"] = {
            split: _write(
                self.pretrain(self.rng(f"pretrain:{split}"), size),
                PRETRAIN,
                out_dir / "pretrain" / f"{split}.parquet",
            )
            for split, size in (("train", target), ("test", max(20_000, int(target * cfg.test_fraction))))
        }
        progress(f"pretrain: {report.rows['pretrain']['train']} documents")

        def n_split(total: int) -> tuple[int, int]:
            n_test = max(1, int(total * cfg.test_fraction))
            return total - n_test, n_test

        write_splits("sft", DIALOGS, self.dialog, *n_split(cfg.sft_dialogs))
        h_train, h_test = n_split(cfg.helpfulness_pairs)
        s_train, s_test = n_split(cfg.safety_pairs)

        def pair(rng: random.Random, i: int, split: str) -> dict:
            n_help = h_train if split == "train" else h_test
            return (
                self.helpfulness_pair(rng, i, split)
                if i < n_help
                else self.safety_pair(rng, i - n_help, split)
            )

        write_splits("preferences", PREFERENCES, pair, h_train + s_train, h_test + s_test)
        # valid: held-out prompts of the test set's kind for choices made during training (PPO's early stopping),
        # so that test prompts are only ever read by the final evaluation.
        write_splits(
            "prompts", PROMPTS, self.prompt, cfg.rl_prompts, cfg.eval_prompts, valid=cfg.eval_prompts
        )
        write_splits("gatt", DIALOGS, self.gatt_dialog, *n_split(cfg.gatt_dialogs))
        return report


def write_world(cfg: WorldConfig, progress: Callable[[str], None] = lambda _: None) -> WorldReport:
    """Write every dataset of the world under ``resolve_path(cfg.out_dir)`` and report row counts."""
    out_dir = resolve_path(cfg.out_dir)
    return WorldWriter(cfg).write(out_dir, progress)
