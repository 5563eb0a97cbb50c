#!/usr/bin/env bash
# llmbatch quickstart, end to end, from any directory:
#   1. build the demo model (examples/demo-model/, ~2 min on 2 CPU cores, skipped if present)
#   2. write the demo prompts (examples/data/prompts.parquet, skipped if present)
#   3. run examples/quickstart.yaml -> out/quickstart/ (parts, _stats/, _manifest/)
#   4. print where the output and stats are, and how many answers match the expected ones
# Exit status: llmbatch's (0 all rows ok, 2 invalid job/input, 3 some rows errored, 1 internal).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."   # the repository root: quickstart.yaml paths are relative to it
PYTHON="${PYTHON:-python}"

"$PYTHON" examples/make_demo_model.py
"$PYTHON" examples/make_demo_data.py

# The `llmbatch` console script (pip install -e .), or the same CLI from a plain checkout.
if command -v llmbatch >/dev/null 2>&1; then LLMBATCH=(llmbatch); else LLMBATCH=("$PYTHON" -m llmbatch.cli); fi

# --progress log prints a line every few seconds (a bar needs a terminal).
rc=0
"${LLMBATCH[@]}" run examples/quickstart.yaml --progress log --log-every 5 || rc=$?
if [[ $rc -ne 0 && $rc -ne 3 ]]; then
    echo "quickstart: llmbatch run failed with exit code $rc" >&2
    exit "$rc"
fi

"$PYTHON" - <<'EOF'
import pyarrow.dataset as ds

from llmbatch.jobs.stats import read_stats

# Reading the output folder as a dataset gives exactly the result rows (_stats/ and
# _manifest/ are skipped because their names start with "_").
rows = ds.dataset("out/quickstart", format="parquet").to_table(
    columns=["id", "task", "expected", "output_text", "finish_reason"]).to_pylist()
stats = read_stats("out/quickstart").to_pylist()[-1]
hits = sum(r["output_text"] == r["expected"] for r in rows)
print(f"\nquickstart: {len(rows)} rows in out/quickstart/ (parts), stats in out/quickstart/_stats/")
print(f"exact match with the expected answers: {hits}/{len(rows)}")
for r in rows[:3]:
    print(f"  {r['id']} {r['task']:<8} expected {r['expected']!r:<32} got {r['output_text']!r}")
print(f"  {stats['rows_ok']} ok / {stats['rows_error']} error rows in {stats['wall_s']:.1f}s, "
      f"{stats['output_tok_s'] or 0:.0f} output tok/s, prefix-cache hit rate "
      f"{stats['prefix_hit_rate'] or 0:.0%}")
EOF
exit "$rc"
