"""Sharded MLorc under real DeepSpeed ZeRO-1/2/3 and FSDP2 jobs (gloo on CPU), world sizes 1-3.

Three launches of tests/dist/worker.py (one per world size) run every scenario; the tests below
read what the ranks wrote. Engines: zero1, zero2, zero2rr (round-robin gradients), zero3, fsdp2.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import mlorc_dist
from mlorc_dist.pieces import Layout, MatrixSpec, Piece, row_split

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist" / "worker.py"
STEPS = 20
# Runs that compute the same numbers by other code paths (world sizes, engines, the fused step)
# are compared over all STEPS in float64 (FSDP2; DeepSpeed trains in float32 whatever the model's
# dtype) and in float32 after EARLY_STEPS steps: over more steps float32 rounding, which differs
# between the paths and between BLAS/LAPACK code paths of the CPU, is amplified where a rank-4
# truncation or a threshold of the negative-entry fix is sensitive to it, so no fixed float32
# bound over many steps holds on every CPU. The second step is the first to rebuild the moments
# from their factors.
EARLY_STEPS = 2
ENGINES = ["zero1", "zero2", "zero2rr", "zero3", "fsdp2"]
WS3_ENGINES = ["zero1", "zero3", "fsdp2"]
BF16_RUNS = ["zero2:mlorc-adamw:local:4:bf16", "zero1:mlorc-adamw:global:4:bf16",
             "zero3:mlorc-adamw:local:4:bf16", "fsdp2:mlorc-adamw:local:4:bf16",
             "fsdp2:mlorc-lion:global:4:bf16"]


# MoFaSGD and GaLore on the same pieces (local scope: replayed single-process; global scope:
# MoFaSGD against world size 1)
PEER_RUNS = ["zero2:mofasgd:local:4", "fsdp2:mofasgd:local:4", "zero3:galore:local:4",
             "fsdp2:galore:local:4"]
PEER_GLOBAL_RUNS = ["zero1:mofasgd:global:4", "zero3:mofasgd:global:4", "fsdp2:mofasgd:global:4",
                    "fsdp2:mofasgd:global:4:fp64"]
# the fused step (fused=True) under real engines, against the reference path's runs
FUSED_RUNS = {"zero2:mlorc-adamw-fused:local:4": "zero2:mlorc-adamw:local:4",
              "fsdp2:mlorc-adamw-fused:local:4": "fsdp2:mlorc-adamw:local:4",
              "zero3:mlorc-lion-fused:local:4": "zero3:mlorc-lion:local:4",
              "zero3:mlorc-adamw-fused:local:4": "zero3:mlorc-adamw:local:4",
              "zero2:mlorc-adamw-fused:local:full": "zero2:adamw"}
FUSED_FP64_RUNS = {"fsdp2:mlorc-adamw-fused:local:4:fp64": "fsdp2:mlorc-adamw:local:4:fp64",
                   "fsdp2:mlorc-lion-fused:local:4:fp64": "fsdp2:mlorc-lion:local:4:fp64"}


def _load_worker():
    spec = importlib.util.spec_from_file_location("dist_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(world: int, runs: list[str], out: Path, port: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_port", str(port), str(WORKER), "--out", str(out), "--steps", str(STEPS),
           "--early-steps", str(EARLY_STEPS), "--runs", *runs]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"world size {world} job failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    ws2 = [f"{e}:{v}" for e in ENGINES for v in
           ("adamw", "mlorc-adamw:local:full", "mlorc-adamw:global:full", "mlorc-adamw:local:4",
            "mlorc-adamw:global:4")]
    ws2 += ["fsdp2:adamw:local:full:fp64", "fsdp2:mlorc-adamw:local:full:fp64",
            "fsdp2:mlorc-adamw:global:4:fp64", "zero2:mlorc-lion:global:4", "fsdp2:mlorc-lion:global:4",
            "zero3:mlorc-lion:local:4", "zero3init:adamw", "zero3init:mlorc-adamw:local:full"]
    ws2 += BF16_RUNS + ["zero2raw:mlorc-adamw"] + PEER_RUNS + PEER_GLOBAL_RUNS + list(FUSED_RUNS)
    ws2 += [run for pair in FUSED_FP64_RUNS.items() for run in pair]
    ws1 = [f"{e}:mlorc-adamw:global:4" for e in ("zero1", "zero2", "zero3", "fsdp2")]
    ws1 += ["fsdp2:mlorc-adamw:global:4:fp64", "zero2:mlorc-lion:global:4", "fsdp2:mlorc-lion:global:4"]
    ws1 += PEER_GLOBAL_RUNS
    ws3 = [f"{e}:{v}" for e in WS3_ENGINES for v in
           ("adamw", "mlorc-adamw:local:full", "mlorc-adamw:global:4", "mlorc-adamw:local:4")]
    for world, runs, port in ((2, ws2, 29521), (1, ws1, 29522), (3, ws3, 29523)):
        (base / f"ws{world}").mkdir()
        launch(world, runs, base / f"ws{world}", port)
    return base


def load(results: Path, world: int, spec: str, rank: int | None = None) -> dict:
    name = spec.replace(":", "_")
    path = results / f"ws{world}" / (f"{name}.pt" if rank is None else f"{name}.rank{rank}.pt")
    return torch.load(path, weights_only=True)


def rel(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    den = sum((b[k] ** 2).sum() for k in b)
    return float((num / den).sqrt())


# --------------------------------------------------------------------------- oracles
def assert_full_rank_is_adamw(mlorc: dict, adamw: dict) -> None:
    """Full-rank MLorc against AdamW through the same engine, float32 (DeepSpeed trains in
    float32; float64 under FSDP2 below). The gap is not rounding carried through the training
    but each step's own: the full-rank rebuild of V is exact to ~eps ||V||, a large relative
    error at the entries far below ||V||, where Adam divides by sqrt(v) (eps ~ 0 here so that the
    two rules coincide); in float32 those entries are clamped to the noise floor, so each step's
    error stays bounded instead of growing. Measured 3.6e-5 after 2 steps and 3.6e-5 to 1.8e-4
    after 20 under MKL's default, AVX2 and AVX-512 code paths (float64: 1e-12 and 3.8e-9)."""
    assert rel(adamw["final"], adamw["initial"]) > 1e-2          # training moved the weights
    assert rel(mlorc["final"], adamw["final"]) <= 1e-3


@pytest.mark.parametrize("world,engine", [(2, e) for e in ENGINES] + [(3, e) for e in WS3_ENGINES])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_full_rank_sharded_mlorc_is_adamw_through_the_same_engine(results, world, engine, scope):
    if world == 3 and scope == "global":
        pytest.skip("world size 3 runs the global scope at rank 4 only (time budget)")
    assert_full_rank_is_adamw(load(results, world, f"{engine}:mlorc-adamw:{scope}:full"),
                              load(results, world, f"{engine}:adamw"))


def test_full_rank_oracle_zero3_under_zero_init(results):
    """Parameters created partitioned (shape (0,), true shape in ds_shape)."""
    assert_full_rank_is_adamw(load(results, 2, "zero3init:mlorc-adamw:local:full"),
                              load(results, 2, "zero3init:adamw"))


@pytest.mark.parametrize("spec", BF16_RUNS)
def test_bf16_engines_train_with_fp32_factors(results, spec):
    run = load(results, 2, spec)
    assert all(torch.isfinite(torch.tensor(run["losses"])))
    assert sum(run["losses"][-5:]) / 5 < run["losses"][0]
    assert rel(run["final"], run["initial"]) > 1e-3
    scope = spec.split(":")[2]
    moments = 1 if "lion" in spec else 2
    for r in range(2):
        data = load(results, 2, spec, r)
        assert data["state_bytes"] == expected_state_bytes(data["layouts"], scope, moments=moments)


def test_full_rank_oracle_float64_fsdp2(results):
    mlorc = load(results, 2, "fsdp2:mlorc-adamw:local:full:fp64")
    adamw = load(results, 2, "fsdp2:adamw:local:full:fp64")
    # Measured 3.5e-9 to 3.8e-9 after 20 steps under MKL's default, AVX2 and AVX-512 code paths:
    # each step's rebuild error at second moment entries far below ||V|| (assert_full_rank_is_adamw),
    # whose size is set by the spread of V's entries, not carried rounding.
    assert rel(mlorc["final"], adamw["final"]) <= 1e-8


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "fsdp2"])
@pytest.mark.parametrize("world", [2, 3])
def test_global_scope_does_not_depend_on_world_size(results, engine, world):
    """float32, after EARLY_STEPS steps (measured 6e-8 to 2.1e-7; after all STEPS 2.4e-7 to
    1.3e-6); all STEPS in float64 below."""
    if world == 3 and engine not in WS3_ENGINES:
        pytest.skip("not run at world size 3")
    one = load(results, 1, f"{engine}:mlorc-adamw:global:4")
    many = load(results, world, f"{engine}:mlorc-adamw:global:4")
    assert rel(one["final"], one["initial"]) > 1e-2
    assert rel(many["early"], one["early"]) <= 1e-5


# float64 over all STEPS (measured 2.4e-16 to 4.3e-16); Lion in float32 after EARLY_STEPS steps
# (measured 0: its update is a sign, which rounding changes only where its argument is within
# rounding of 0, by 2 lr in that entry, 1.2e-5 of the weights' norm each)
@pytest.mark.parametrize("spec,tol", [("fsdp2:mlorc-adamw:global:4:fp64", 1e-9),
                                      ("zero2:mlorc-lion:global:4", 1e-4),
                                      ("fsdp2:mlorc-lion:global:4", 1e-4)])
def test_global_scope_world_size_invariance_float64_and_lion(results, spec, tol):
    one, two = load(results, 1, spec), load(results, 2, spec)
    assert rel(one["final"], one["initial"]) > 1e-3
    at = "final" if spec.endswith("fp64") else "early"
    assert rel(two[at], one[at]) <= tol


# --------------------------------------------------------------------------- plumbing: replay
def replay(results: Path, world: int, spec: str) -> float:
    """Run the same optimizer single-process on whole parameters, handed the same cuts and the
    gradients each piece received, and compare with the sharded run's final weights."""
    worker = _load_worker()
    run = load(results, world, spec)
    ranks = [load(results, world, spec, r) for r in range(world)]
    engine, opt_name, scope, rank_arg = spec.split(":")[:4]
    cls_name, params, kwargs = worker.make_optimizer_kwargs(opt_name, scope, rank_arg)
    model = worker.tiny_llama(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(run["initial"][name].float())
    compress = kwargs.pop("compress_embeddings")
    groups = mlorc_dist.param_groups(model, compress_embeddings=compress)
    optimizer = getattr(mlorc_dist, cls_name)(groups, **params, **kwargs)
    cuts = defaultdict(set)
    for r in ranks:
        for layout in r["layouts"]:
            for key, shape, start, stop, lowrank in layout:
                cuts[key].add((start, stop, tuple(shape), lowrank))
    for name, p in model.named_parameters():
        pieces = sorted(cuts[name])
        spec_ = MatrixSpec(name, pieces[0][2], pieces[0][3])
        layout = Layout([Piece(spec_, a, b, a) for a, b, _, _ in pieces],
                        [spec_] if spec_.lowrank else [], None, "replay")
        optimizer.attach_layout(p, layout)
    grads = defaultdict(dict)
    for r in ranks:
        for step, key, start, stop, values in r["grad_log"]:
            grads[step][(key, start)] = values
    params_by_name = dict(model.named_parameters())
    for step in range(1, STEPS + 1):
        for name, p in params_by_name.items():
            g = torch.zeros(p.numel())
            for a, b, _, _ in sorted(cuts[name]):
                if b > a:
                    g[a:b] = grads[step][(name, a)]
            p.grad = g.view_as(p)
        optimizer.step()
    final = {n: p.detach().double() for n, p in model.named_parameters()}
    return rel(final, run["final"])


@pytest.mark.parametrize("world,engine", [(2, e) for e in ENGINES] + [(3, e) for e in WS3_ENGINES])
def test_local_scope_equals_single_process_handed_the_same_cuts(results, world, engine):
    assert replay(results, world, f"{engine}:mlorc-adamw:local:4") <= 1e-6


def test_local_scope_lion_replay_zero3(results):
    assert replay(results, 2, "zero3:mlorc-lion:local:4") <= 1e-6


@pytest.mark.parametrize("spec", [s for s in FUSED_RUNS if not s.endswith("full")])
def test_fused_local_scope_equals_single_process_handed_the_same_cuts(results, spec):
    """The fused step on an engine's pieces is the fused step on whole parameters: the same
    float32 arithmetic on the same gradients, over all STEPS."""
    assert replay(results, 2, spec) <= 1e-6


# --------------------------------------------------------------------------- collectives
def expected_global_all_reduce_elements(rank=4, oversample=0, niter=1, moments=2, stats=2) -> int:
    worker = _load_worker()
    model = worker.tiny_llama(torch.float32)
    groups = mlorc_dist.param_groups(model, compress_embeddings=True)
    per_step = 1
    for p in groups[0]["params"]:
        m, n = p[1].shape
        q = min(rank + oversample, m, n)
        if (m + n + 1) * min(rank, m, n) < m * n:
            per_step += stats + moments * (m + n) * q * (1 + niter)
    return per_step * STEPS


@pytest.mark.parametrize("engine", ENGINES)
def test_collectives_inside_step(results, engine):
    for r in range(2):
        local = load(results, 2, f"{engine}:mlorc-adamw:local:4", r)
        assert local["calls"] == {}, local["calls"]
        glob = load(results, 2, f"{engine}:mlorc-adamw:global:4", r)
        assert set(glob["calls"]) == {"all_reduce"}, glob["calls"]
        assert glob["calls"]["all_reduce"] == STEPS * (1 + 2 * 2)     # stats, then (Y, B) per pass
        assert glob["all_reduce_elements"] == expected_global_all_reduce_elements()


# --------------------------------------------------------------------------- state bytes, layouts
def expected_state_bytes(layouts, scope: str, rank=4, moments=2) -> int:
    total = 0
    for layout in layouts:
        for key, shape, start, stop, lowrank in layout:
            numel = stop - start
            dense = moments * numel * 4
            if not lowrank:
                total += dense
                continue
            m, n = shape
            if scope == "global":
                r = min(rank, m, n)
                rows = 0 if numel == 0 else (stop - 1) // n - start // n + 1
                total += moments * 4 * r * (rows + 1 + n) if (m + n + 1) * r < m * n else dense
                continue
            split = row_split(start, stop, n)
            k = split.body_rows
            r = min(rank, k, n)
            if k and (k + n + 1) * r < k * n:
                total += moments * 4 * (r * (k + n + 1) + split.head + split.tail)
            else:
                total += dense
    return total


@pytest.mark.parametrize("world,engine", [(2, e) for e in ENGINES] + [(3, e) for e in WS3_ENGINES])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_state_bytes_per_rank_match_formula(results, world, engine, scope):
    for r in range(world):
        data = load(results, world, f"{engine}:mlorc-adamw:{scope}:4", r)
        assert data["state_bytes"] == expected_state_bytes(data["layouts"], scope)


@pytest.mark.parametrize("world", [2, 3])
def test_layouts_cut_mid_row_and_shard_unevenly(results, world):
    for engine in ("zero1", "zero3") + (("zero2",) if world == 2 else ()):
        mid_row = 0
        for r in range(world):
            for layout in load(results, world, f"{engine}:mlorc-adamw:local:4", r)["layouts"]:
                for key, shape, start, stop, lowrank in layout:
                    if len(shape) == 2 and (start % shape[1] or stop % shape[1]):
                        mid_row += 1
        assert mid_row > 0, engine
    rows = defaultdict(list)
    for r in range(world):
        for layout in load(results, world, "fsdp2:mlorc-adamw:local:4", r)["layouts"]:
            for key, shape, start, stop, lowrank in layout:
                if len(shape) == 2:
                    assert start % shape[1] == 0 and stop % shape[1] == 0
                    rows[key].append((stop - start) // shape[1])
    assert any(len(set(v)) > 1 for v in rows.values())           # uneven FSDP2 shards


@pytest.mark.parametrize("engine", ENGINES)
def test_every_element_is_trained_and_counted(results, engine):
    """Pieces of all ranks tile every parameter exactly once; the start-up counts add up."""
    worker = _load_worker()
    numel = {n: p.numel() for n, p in worker.tiny_llama(torch.float32).named_parameters()}
    covered = defaultdict(int)
    for r in range(2):
        data = load(results, 2, f"{engine}:mlorc-adamw:local:4", r)
        for layout in data["layouts"]:
            for key, shape, start, stop, lowrank in layout:
                covered[key] += stop - start
        summary = data["treatments"]
        assert summary["low-rank (local body)"]["pieces"] > 0
        assert sum(v["elements"] for v in summary.values()) == sum(
            stop - start for layout in data["layouts"] for _, _, start, stop, _ in layout)
    assert dict(covered) == numel


def test_plain_deepspeed_initialize_with_mlorc_refuses_to_step(results):
    """Without mlorc_dist.deepspeed.initialize the optimizer sees flat 1-D partitions: it must
    raise a clear ValueError, not silently run something else."""
    for r in range(2):
        data = torch.load(results / "ws2" / f"zero2raw.rank{r}.pt", weights_only=True)
        assert data["error"] is not None and "mlorc_dist.deepspeed.initialize" in data["error"]
        assert data["unchanged"]


# --------------------------------------------------------------------------- MoFaSGD and GaLore
@pytest.mark.parametrize("spec", PEER_RUNS)
def test_peers_local_scope_equal_single_process_handed_the_same_cuts(results, spec):
    run = load(results, 2, spec)
    assert rel(run["final"], run["initial"]) > 1e-3
    assert replay(results, 2, spec) <= 1e-6
    for r in range(2):
        assert load(results, 2, spec, r)["calls"] == {}       # per shard: no collective at all


@pytest.mark.parametrize("spec", PEER_GLOBAL_RUNS)
def test_mofasgd_global_scope_world_size_2_is_world_size_1(results, spec):
    """float64 over all STEPS (measured 1.3e-15), float32 after EARLY_STEPS steps (measured
    1.4e-8 to 6.2e-8; after all STEPS 1.5e-7 to 5.8e-7)."""
    one, two = load(results, 1, spec), load(results, 2, spec)
    assert rel(one["final"], one["initial"]) > 1e-3
    if spec.endswith("fp64"):
        assert rel(two["final"], one["final"]) <= 1e-9
    else:
        assert rel(two["early"], one["early"]) <= 1e-5


def test_mofasgd_global_scope_collectives(results):
    """Four all-reduces per step (G V rows and G^T U; the second projection; two Gram
    matrices) plus the non-finite flag, and at the first step the global SVD of W (niter 2)."""
    for r in range(2):
        calls = load(results, 2, "fsdp2:mofasgd:global:4", r)["calls"]
        assert calls == {"all_reduce": STEPS * 5 + 2 + 2 * 2}, calls


@pytest.mark.parametrize("spec", list(FUSED_RUNS))
def test_fused_step_under_real_engines_equals_the_reference_path(results, spec):
    """fused=True in real ZeRO-2 / ZeRO-3 / FSDP2 jobs: the same training as the reference path
    (rank 4; float32 after EARLY_STEPS steps, measured 1.1e-7 to 1.3e-7, and up to 1.4e-6 after
    all STEPS; over all STEPS the replay test above and the float64 runs below), and at full
    rank the same as AdamW through the same engine."""
    fused, reference = load(results, 2, spec), load(results, 2, FUSED_RUNS[spec])
    assert rel(fused["final"], fused["initial"]) > 1e-4              # it trained
    if spec.endswith("full"):
        assert_full_rank_is_adamw(fused, reference)
    else:
        assert rel(fused["early"], reference["early"]) <= 1e-5


@pytest.mark.parametrize("spec", list(FUSED_FP64_RUNS))
def test_fused_step_under_fsdp2_equals_the_reference_path_in_float64(results, spec):
    """Over all STEPS: the same numbers to float64 rounding (measured 5.4e-16 to 6.1e-16; Lion 0)."""
    fused, reference = load(results, 2, spec), load(results, 2, FUSED_FP64_RUNS[spec])
    assert rel(fused["final"], fused["initial"]) > 1e-4
    assert rel(fused["final"], reference["final"]) <= 1e-10
