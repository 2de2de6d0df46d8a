"""The sampling trade-off: sample quality against denoising steps, next to AR sampling.

    python -m sweeps.sample_tradeoff root=DIR [steps=[4,8,16,32,64,128,256]] [n=8]
                                     [samplers=[ancestral,remask]] [diffusion=ID] [ar=ID] [judge=ID]

For the trained diffusion model (default: the most-trained done diffusion run in ROOT) it
draws n samples per (sampler, steps), and as many from the autoregressive model whose training
FLOPs are closest to it (KV-cache decoding), all as one batch starting at a document start
(EOD). Every batch is timed after compilation (tokens/s, host-side float64 draws included) and
scored by the judge: the AR-family run of ROOT with the lowest held-out bits per byte. Quality
is the judge's bits per byte on the samples (lower = more like what the judge expects), next to
the byte-unigram entropy of the samples (a collapse to repetitive text lowers the judge's bpb
too, and shows up as a low entropy). Writes ROOT/report/sampling_tradeoff.{md,json,png,pdf}.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from archs.errors import ConfigError
from archs.objective import token_nll
from archs.sampling import ARSampler
from diffusion.samplers import ModelDenoiser
from sweeps.config import TradeoffConfig
from sweeps.engine.data import byte_unigram_bits
from sweeps.engine.dataset import open_dataset
from sweeps.engine.tokenizer import decode
from sweeps.engine.records import ResultsDB
from sweeps.tools.sample import data_config_of, generate, load_run, prompt_tokens


HELDOUT_TOKENS = 2_000_000  # enough held-out text for its byte entropy


# --- choosing the runs -------------------------------------------------------------------------


def _done(root: str, objective: str) -> list[dict]:
    return [r for r in ResultsDB(root).rows("WHERE status = 'done' AND objective = ?", (objective,))
            if (Path(root) / "runs" / r["run_id"] / "ckpt").exists()]


def choose_runs(tc: TradeoffConfig) -> tuple[str, str, str]:
    if not (Path(tc.root) / "results.sqlite").exists():
        raise ConfigError(f"no results database in {tc.root}; train runs there first "
                          f"(python -m sweeps.run root={tc.root} ...)")
    diff_rows, ar_rows = _done(tc.root, "diffusion"), _done(tc.root, "ar")
    if not tc.diffusion and not diff_rows:
        raise ConfigError(f"no finished diffusion run in {tc.root}; train one: python -m sweeps.run +arch=diffusion "
                          f"sweep=none root={tc.root}")
    if not (tc.ar and tc.judge) and not ar_rows:
        raise ConfigError(f"no finished autoregressive run in {tc.root} to sample from and judge with; train one: "
                          f"python -m sweeps.run +arch=ar sweep=none root={tc.root}")
    diffusion = tc.diffusion or max(diff_rows, key=lambda r: (r["flops"] or 0, r["created_at"] or 0))["run_id"]
    flops = next((r["flops"] for r in diff_rows if r["run_id"] == diffusion), None) or 1.0
    ar = tc.ar or min(ar_rows, key=lambda r: (abs(math.log((r["flops"] or 1.0) / flops)), r["eval_bpb"]))["run_id"]
    judge = tc.judge or min(ar_rows, key=lambda r: r["eval_bpb"] if r["eval_bpb"] is not None else math.inf)["run_id"]
    return diffusion, ar, judge


# --- scoring -----------------------------------------------------------------------------------


def _text(sample_ids, tokenizer) -> bytes:
    """The text bytes of a sample's generated tokens (after its leading EOD)."""
    return decode(tokenizer.token_bytes, np.asarray(sample_ids)[1:].tolist())


class Judge:
    """An AR model's bits per byte on samples [n, L]: tokens 1..L-1 given everything before."""

    def __init__(self, run):
        self.run = run
        graphdef, state = nnx.split(run.model)
        self.state = state
        self._nats = jax.jit(lambda s, w: token_nll(nnx.merge(graphdef, s)(w[:, :-1]), w[:, 1:]).sum(axis=1))

    def score(self, samples_bl) -> dict:
        nats_n = np.asarray(self._nats(self.state, jnp.asarray(samples_bl, jnp.int32)), np.float64)
        bytes_n = np.array([max(1, len(_text(s, self.run.tokenizer))) for s in samples_bl], np.float64)
        per = nats_n / math.log(2) / bytes_n
        return {"judge_bpb": float(nats_n.sum() / math.log(2) / bytes_n.sum()),
                "judge_bpb_se": float(per.std(ddof=1) / math.sqrt(len(per))) if len(per) > 1 else 0.0}


def byte_entropy_bits(text: bytes) -> float:
    """Entropy (bits) of the byte distribution of a text."""
    return byte_unigram_bits(np.frombuffer(text, np.uint8))


def unigram_entropy_bits(samples_bl, tokenizer) -> float:
    """Entropy (bits) of the pooled byte distribution of the samples' generated text."""
    return byte_entropy_bits(b"".join(_text(s, tokenizer) for s in samples_bl))


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --- the comparison ----------------------------------------------------------------------------


def run_tradeoff(tc: TradeoffConfig) -> dict:
    ids = choose_runs(tc)
    diff, ar, judge_run = (load_run(tc.root, i) for i in ids)
    for r in (diff, ar, judge_run):
        r.require_text()
    objectives = (diff.model_cfg.objective, ar.model_cfg.objective, judge_run.model_cfg.objective)
    if objectives != ("diffusion", "ar", "ar"):
        raise ConfigError("diffusion= must name a diffusion run, ar= and judge= autoregressive runs")
    tok = judge_run.tokenizer
    if any((r.tokenizer.name, r.tokenizer.vocab) != (tok.name, tok.vocab) for r in (diff, ar)):
        raise ConfigError("the diffusion, AR and judge runs use different tokenizers; the judge scores samples "
                          "token by token, so pick runs trained on the same data (diffusion=, ar=, judge=)")
    length = tc.length or int(diff.cfg.train.seq_len)
    n_gen = length - len(prompt_tokens("", tok))
    judge = Judge(judge_run)
    common = dict(n=tc.n, length=length, seed=tc.seed, temperature=tc.temperature)

    rows = []
    denoiser = ModelDenoiser(diff.model)
    generate(diff, **common, steps=1, denoiser=denoiser)  # compile outside the timing
    for sampler in tc.samplers:
        for steps in tc.steps:
            (tokens, stats), wall = _timed(lambda: generate(
                diff, **common, steps=steps, sampler=sampler, confidence=tc.confidence, denoiser=denoiser,
                progress=tc.progress))
            rows.append({"family": "diffusion", "run_id": diff.run_id, "sampler": sampler, "steps": stats["steps"],
                         "nfe": stats["nfe"], "wall_s": wall, "tokens_per_s": tc.n * n_gen / wall,
                         "entropy_bits": unigram_entropy_bits(tokens, tok), **judge.score(tokens)})
            print(f"{sampler:>9} steps={stats['steps']:>4}: judge {rows[-1]['judge_bpb']:.3f} bpb, "
                  f"{rows[-1]['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    ar_sampler = ARSampler(ar.model)
    ar_sampler.generate(np.full((tc.n, 1), tok.vocab.eod), 1, max_len=length)  # compile outside the timing
    (tokens, stats), wall = _timed(lambda: generate(ar, **common, steps=0, ar_sampler=ar_sampler,
                                                    progress=tc.progress))
    rows.append({"family": "ar", "run_id": ar.run_id, "sampler": "kv-cache", "steps": n_gen, "nfe": stats["nfe"],
                 "wall_s": wall, "tokens_per_s": tc.n * n_gen / wall, "entropy_bits": unigram_entropy_bits(tokens, tok),
                 **judge.score(tokens)})

    held = open_dataset(data_config_of(judge_run.cfg)).heldout
    n_held = min(held.size, HELDOUT_TOKENS)
    held_text = decode(tok.token_bytes, held.gather(np.zeros(1, np.int64), n_held)[0].tolist())

    def info(r):
        return {k: (r.row or {}).get(k) for k in ("run_id", "arch", "params", "nonembed_params", "tokens", "flops",
                                                  "eval_bpb", "eval_samples")}

    return {
        "diffusion": info(diff), "ar": info(ar), "judge": info(judge_run),
        "settings": {"n": tc.n, "length": length, "generated_tokens": n_gen, "seed": tc.seed,
                     "temperature": tc.temperature, "confidence": tc.confidence, "schedule":
                     diff.model_cfg.diffusion.schedule, "device": str(jax.devices()[0].platform)},
        "heldout_unigram_entropy_bits": byte_entropy_bits(held_text),
        "rows": rows,
    }


# --- report ------------------------------------------------------------------------------------


def write_report(result: dict, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"sampling_tradeoff.{ext}" for ext in ("json", "md", "png", "pdf")]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result))
    fig = figure(result)
    for p in paths[2:]:
        fig.savefig(p, bbox_inches="tight", dpi=150)
    return paths


def _bpb(x):
    return "n/a" if x is None else f"{x:.3f}"


def markdown(res: dict) -> str:
    d, a, j, s = res["diffusion"], res["ar"], res["judge"], res["settings"]
    lines = [
        "# Sampling trade-off: masked diffusion steps vs autoregressive decoding", "",
        f"- diffusion model: `{d['run_id']}` ({d['params']:,} params, {d['tokens']:,} tokens, {d['flops']:.3g} FLOPs; "
        f"held-out NELBO <= {_bpb(d['eval_bpb'])} bits/byte, schedule {s['schedule']})",
        f"- AR model sampled: `{a['run_id']}` ({a['params']:,} params, {a['flops']:.3g} FLOPs, "
        f"{a['flops'] / d['flops']:.2f}x the diffusion model's; held-out {_bpb(a['eval_bpb'])} bits/byte)",
        f"- judge: `{j['run_id']}` (held-out {_bpb(j['eval_bpb'])} bits/byte on real text)",
        f"- {s['n']} samples of {s['generated_tokens']} tokens after an EOD, temperature {s['temperature']}, "
        f"seed {s['seed']}, float64 categorical draws, on {s['device']}; held-out text byte-unigram entropy "
        f"{res['heldout_unigram_entropy_bits']:.3f} bits", "",
        "| family | sampler | steps | model calls | tokens/s | judge bits/byte of samples "
        "| sample unigram entropy (bits) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(f"| {r['family']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['judge_bpb']:.3f} ± {r['judge_bpb_se']:.3f} | {r['entropy_bits']:.3f} |")
    lines += [
        f"| held-out text | - | - | - | - | {_bpb(j['eval_bpb'])} | {res['heldout_unigram_entropy_bits']:.3f} |",
        "",
        "Judge bits/byte: total judge NLL of the generated tokens (EOD included, as in eval_bpb) over their "
        "bytes; ± is the standard error across samples. Lower is closer to the judge's idea of the data, but "
        "repetitive text also scores low: read it together with the unigram entropy. When the judge is the "
        "sampled AR model itself, AR samples are scored by their own distribution and are favoured; a larger "
        "AR judge in the same root removes that bias. tokens/s counts generated tokens of the whole batch per "
        "second of wall time after compilation, host-side sampling included.",
    ]
    return "\n".join(lines) + "\n"


def figure(res: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_q, ax_e, ax_s) = plt.subplots(1, 3, figsize=(15, 4))
    diff_rows = [r for r in res["rows"] if r["family"] == "diffusion"]
    ar_row = next(r for r in res["rows"] if r["family"] == "ar")
    for sampler in dict.fromkeys(r["sampler"] for r in diff_rows):
        rs = sorted((r for r in diff_rows if r["sampler"] == sampler), key=lambda r: r["steps"])
        x = [r["steps"] for r in rs]
        ax_q.errorbar(x, [r["judge_bpb"] for r in rs], yerr=[r["judge_bpb_se"] for r in rs], marker="o",
                      capsize=2, label=f"diffusion, {sampler}")
        ax_e.plot(x, [r["entropy_bits"] for r in rs], marker="o", label=f"diffusion, {sampler}")
        ax_s.plot(x, [r["tokens_per_s"] for r in rs], marker="o", label=f"diffusion, {sampler}")
    ax_q.axhline(ar_row["judge_bpb"], color="k", ls="--", label="AR samples (KV cache)")
    if res["judge"]["eval_bpb"] is not None:
        ax_q.axhline(res["judge"]["eval_bpb"], color="gray", ls=":", label="held-out text")
    ax_e.axhline(ar_row["entropy_bits"], color="k", ls="--", label="AR samples (KV cache)")
    ax_e.axhline(res["heldout_unigram_entropy_bits"], color="gray", ls=":", label="held-out text")
    ax_s.axhline(ar_row["tokens_per_s"], color="k", ls="--", label="AR (KV cache)")
    for ax in (ax_q, ax_e, ax_s):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("denoising steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_q.set_ylabel("judge bits/byte of samples (lower = better)")
    ax_e.set_ylabel("unigram entropy of samples (bits)")
    ax_s.set_ylabel("generated tokens / s")
    ax_s.set_yscale("log")
    fig.suptitle(f"sampling trade-off (judge: {res['judge']['run_id']})", fontsize=9)
    fig.tight_layout()
    return fig


def main(tc: TradeoffConfig) -> None:
    result = run_tradeoff(tc)
    paths = write_report(result, Path(tc.root) / "report")
    print(markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths), file=sys.stderr)
