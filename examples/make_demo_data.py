#!/usr/bin/env python
"""Write the demo prompts Parquet for examples/quickstart.yaml.

    python examples/make_demo_data.py            # -> examples/data/prompts.parquet (300 rows)

Columns:
  id             string  "q00000", ...            (the job's id_column)
  messages       list<struct<role, content>>      system + user turn (the job's messages_column)
  prompt         string  the user text alone      (for jobs that use prompt_column + system_prompt)
  system_prompt  string  which system prompt the row uses
  task           string  Repeat | Reverse | First | Last
  expected       string  the exact answer, to score the output against

Every row uses one of three long system prompts (demo_tasks.DEMO_SYSTEM_PROMPTS), in shuffled
order, so the rows fall into three groups that share a prefix of several KV blocks: what
llmbatch's prefix ordering and prefix cache are for. Seeded: the same arguments give the same file.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # demo_tasks lives next to this file

import demo_tasks  # noqa: E402


# The demo file's own task mix (independent of the training mix in demo_tasks.TASK_WEIGHTS, so
# retuning training does not change the demo rows).
DATA_TASK_WEIGHTS = {"Repeat": 4, "Reverse": 4, "First": 1, "Last": 1}


def build_rows(num_rows: int, seed: int) -> dict[str, list]:
    """Column-major rows with distinct user texts (so ids map to distinct prompts)."""
    rng = random.Random(seed)
    columns: dict[str, list] = {k: [] for k in
                                ("id", "messages", "prompt", "system_prompt", "task", "expected")}
    seen: set[str] = set()
    while len(columns["id"]) < num_rows:
        task, words = demo_tasks.sample_prompt(rng, DATA_TASK_WEIGHTS)
        text = demo_tasks.user_text(task, words)
        if text in seen:
            continue
        seen.add(text)
        system = rng.choice(demo_tasks.DEMO_SYSTEM_PROMPTS)
        columns["id"].append(f"q{len(columns['id']):05d}")
        columns["messages"].append([{"role": "system", "content": system},
                                    {"role": "user", "content": text}])
        columns["prompt"].append(text)
        columns["system_prompt"].append(system)
        columns["task"].append(task)
        columns["expected"].append(demo_tasks.answer_text(task, words))
    return columns


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write the llmbatch demo prompts Parquet.")
    p.add_argument("--out", type=Path, default=HERE / "data" / "prompts.parquet")
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = p.parse_args(argv)
    if args.rows <= 0:
        p.error("--rows must be positive")
    if args.out.exists() and not args.force:
        print(f"demo data already exists at {args.out} (use --force to rewrite)")
        return 0

    import pyarrow as pa
    import pyarrow.parquet as pq

    message_type = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    columns = build_rows(args.rows, args.seed)
    schema = pa.schema([("id", pa.string()), ("messages", message_type), ("prompt", pa.string()),
                        ("system_prompt", pa.string()), ("task", pa.string()),
                        ("expected", pa.string())])
    table = pa.table(columns, schema=schema)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(args.out)  # atomic: a killed run never leaves a half-written Parquet
    counts = {t: columns["task"].count(t) for t in demo_tasks.TASKS}
    print(f"wrote {table.num_rows} prompts ({', '.join(f'{t} {n}' for t, n in counts.items())}; "
          f"{len(demo_tasks.DEMO_SYSTEM_PROMPTS)} shared system prompts) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
