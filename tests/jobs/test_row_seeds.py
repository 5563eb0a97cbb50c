"""Row seeds: splitmix64 of (sampling.seed, global row index), not `seed + row index`.

The additive rule gave job seed s + 1 row i the seed of job seed s row i + 1, so changing the
seed repeated 19 of 20 samples of a prompt asked for 20 times."""

import pyarrow.dataset as ds
import pytest

from llmbatch.jobs.loader import load_job
from llmbatch.runtime.seed_mixing import derive_seed

BASE = {"model": {"path": "m"}, "input": {"path": "x.parquet"}, "output": {"path": "o"}}


def spec(**sampling):
    return load_job({**BASE, "sampling": sampling})


def row_seeds(job_seed, rows):
    s = spec(seed=job_seed)
    return [s.sampling_params(row_seed_offset=i).seed for i in rows]


def test_row_seed_is_splitmix64_of_job_seed_and_row_index():
    # Row 0 of seed 0 is splitmix64's first output from state 0 (0xE220A8397B1DCDAF), as int64.
    assert 0xE220A8397B1DCDAF - 2**64 == -2152535657050944081
    assert row_seeds(0, [0, 1]) == [-2152535657050944081, 7960286522194355700]
    assert row_seeds(1, [0]) == [-4616330145664149646]
    assert row_seeds(5, [3]) == [-4263995026347871831] == [derive_seed(5, 3)]


def test_seeds_one_apart_share_no_row_seed():
    # Before: row_seeds(1, range(20)) == row_seeds(0, range(1, 21)), 19 of 20 shared.
    assert not set(row_seeds(1, range(20))) & set(row_seeds(0, range(20)))
    assert len(set(row_seeds(0, range(1000)))) == 1000


@pytest.mark.parametrize("job_seed", [2**63 - 1, -(2**63), -1])
def test_row_seeds_stay_int64(job_seed):
    for seed in row_seeds(job_seed, [0, 1, 2**40]):
        assert -(2**63) <= seed < 2**63


def test_a_rows_own_seed_is_used_as_is():
    assert spec(seed=5).sampling_params({"seed": 42}, row_seed_offset=3).seed == 42


def test_every_job_hash_changes_with_the_output_rules_version():
    # The hashes under the payload before OUTPUT_RULES_VERSION (rules v1 and today's commits
    # before it): 57cc1a0 changed only sampled jobs' hashes, so a greedy folder written by
    # ac16046 resumed and mixed rows of both rules (stop token text, prompt length and
    # whitespace rules changed for greedy jobs too). Every job's hash changes now.
    before = {(): ("64bf29a9d049b198", "64bf29a9d049b198"),
              (("temperature", 0.7),): ("71b6c33eaa8eb94f", "b9448a43f43e67ac"),
              (("per_row", ("temperature",)),): ("9037e221e2315d75", "3677644b04b86ed8")}
    # Under output rules v4 (v3: 72d03505ccb15fb9, 24059e341ef69ef5, df9fe5db8f36addc;
    # v2: fc277b639e7a62d8, b3934413755780be, 20dd496dedf9e421).
    now = {(): "678dc987e780e0a3", (("temperature", 0.7),): "0869db6656dec45f",
           (("per_row", ("temperature",)),): "db722c6ea3749661"}
    for key, old in before.items():
        sampling = {k: list(v) if isinstance(v, tuple) else v for k, v in key}
        assert spec(**sampling).config_hash(1) == now[key]
        assert now[key] not in old


def test_next_job_seed_gives_new_samples_on_the_real_engine(tmp_path, tiny_llama_dir, jobkit,
                                                           monkeypatch):
    """Eight samples of one prompt under seed 0 and seed 1 share none (they shared seven)."""
    pytest.importorskip("llmbatch.runtime.engine")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmbatch import run_job

    monkeypatch.delenv("LLMBATCH_ENGINE_FACTORY", raising=False)
    inp = str(tmp_path / "in.parquet")
    pq.write_table(pa.table({"prompt": ["the cat sat on the mat"] * 8}), inp)

    def samples(seed):
        out = str(tmp_path / f"out{seed}")
        run_job(jobkit.make_job(tiny_llama_dir, inp, out, engine={"device": "cpu"}, sampling={
            "max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True, "seed": seed}))
        return [tuple(t) for t in ds.dataset(out).to_table().column("output_token_ids")
                .to_pylist()]

    seed0, seed1 = samples(0), samples(1)
    assert len(set(seed0)) == 8
    assert [seed1[i] == seed0[i + 1] for i in range(7)] == [False] * 7
    assert not set(seed0) & set(seed1)
