"""Print samples from a trained checkpoint of either family.

    python -m sweeps.sample root=DIR run=ID steps=N [n=4] [length=0] [sampler=ancestral]
                            [prompt="def "] [temperature=1.0] [seed=0] [block_len=32]

`run` is a run id under ROOT/runs (a unique prefix is enough; empty: the newest done run).
Diffusion runs denoise `length` tokens in `steps` steps with the chosen sampler (ancestral |
remask | semiar); autoregressive runs decode token by token with their cache (`steps` does not
apply). Every sample starts with EOD, i.e. at the start of a document, followed by the
prompt's bytes when one is given. Arguments are Hydra-style key=value pairs, checked against
SampleConfig: a typo'd key is a one-line error.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from omegaconf import OmegaConf

from archs.config import ModelConfig
from archs.errors import ConfigError
from archs.model import Model
from archs.sizes import resolve
from sweeps.checkpoint import Checkpointer
from sweeps.data import EOD
from sweeps.results import ResultsDB


@dataclass
class SampleConfig:
    root: str = "runs"
    run: str = ""  # run id or a unique prefix of one; empty: the newest done run in root
    steps: int = 0  # diffusion denoising steps; 0: one per generated token
    n: int = 4  # samples (one batch)
    length: int = 0  # tokens per sample, EOD and prompt included; 0: the run's train.seq_len
    sampler: str = "ancestral"  # diffusion: ancestral | remask | semiar
    block_len: int = 32  # semiar: tokens per semi-autoregressive block
    confidence: str = "prob"  # remask / semiar: prob (LLaDA) | top | margin | random
    temperature: float = 1.0
    cache: bool = True  # ancestral: reuse the denoiser output while nothing changed
    prompt: str = ""
    seed: int = 0
    progress: bool = True


def parse_args(argv: list[str], schema):
    """key=value arguments merged into a structured config (unknown keys and bad types fail)."""
    bad = [a for a in argv if "=" not in a or a.startswith("=")]
    if bad:
        raise ConfigError(f"arguments must be key=value; got {bad[0]!r}")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.from_dotlist([a.lstrip("+") for a in argv]))
        return OmegaConf.to_object(cfg)
    except Exception as e:  # noqa: BLE001 - omegaconf's validation errors, made one line
        raise ConfigError(str(e).splitlines()[0]) from None


# --- loading a trained run ---------------------------------------------------------------------


@dataclass
class LoadedRun:
    run_id: str
    cfg: object  # the run's composed config (OmegaConf)
    model_cfg: ModelConfig
    model: Model
    step: int
    row: dict | None


def find_run(root: str, run: str) -> str:
    runs_dir = Path(root) / "runs"
    ids = sorted(p.name for p in runs_dir.glob("*") if (p / "config.yaml").exists()) if runs_dir.exists() else []
    if not ids:
        raise ConfigError(f"no trained runs under {runs_dir}; train one with python -m sweeps.run root={root} ...")
    if not run:
        done = [r for r in ResultsDB(root).rows("WHERE status = 'done'") if r["run_id"] in ids]
        if not done:
            raise ConfigError(f"no finished run in {root}; pass run=ID (one of {', '.join(ids)})")
        return done[-1]["run_id"]
    if run in ids:
        return run
    hits = [i for i in ids if i.startswith(run)]
    if len(hits) != 1:
        what = "matches several runs" if hits else "matches no run"
        raise ConfigError(f"run={run!r} {what} in {runs_dir}; choose one of: {', '.join(hits or ids)}")
    return hits[0]


def model_config_of(run_cfg) -> ModelConfig:
    """The run's ModelConfig, through the current schema (fields added since get their defaults)."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), run_cfg.arch)
    return resolve(OmegaConf.to_object(merged))


def load_run(root: str, run: str) -> LoadedRun:
    """Rebuild a run's model from its saved config and restore its newest readable parameters."""
    run_id = find_run(root, run)
    rdir = Path(root) / "runs" / run_id
    cfg = OmegaConf.load(rdir / "config.yaml")
    mc = model_config_of(cfg)
    abstract = nnx.eval_shape(lambda: Model(mc, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_state))
    restored = Checkpointer(rdir / "ckpt").restore_params(target) if (rdir / "ckpt").exists() else None
    if restored is None:
        raise ConfigError(f"run {run_id} has no readable checkpoint in {rdir / 'ckpt'}; train it to the end first")
    step, params = restored
    nnx.replace_by_pure_dict(abstract_state, params)
    return LoadedRun(run_id, cfg, mc, nnx.merge(graphdef, abstract_state), step, ResultsDB(root).get(run_id))


# --- sampling ----------------------------------------------------------------------------------


def prompt_tokens(prompt: str) -> np.ndarray:
    """EOD (start of a document) followed by the prompt's UTF-8 bytes."""
    return np.concatenate([[EOD], np.frombuffer(prompt.encode(), np.uint8)]).astype(np.int32)


def generate(run: LoadedRun, *, n: int, length: int, steps: int, sampler: str = "ancestral", prompt: str = "",
             seed: int = 0, temperature: float = 1.0, block_len: int = 32, confidence: str = "prob",
             cache: bool = True, progress: bool = False, ar_sampler=None, denoiser=None):
    """Samples [n, length] (prefix included) and the sampler's stats."""
    prefix = prompt_tokens(prompt)
    if n < 1 or steps < 0 or temperature < 0 or block_len < 0:
        raise ConfigError(f"need n >= 1, steps >= 0, temperature >= 0 and block_len >= 0; got n={n} steps={steps} "
                          f"temperature={temperature} block_len={block_len}")
    if length <= len(prefix):
        raise ConfigError(f"length={length} leaves no room after the {len(prefix)}-token prefix; raise length")
    if run.model_cfg.objective == "diffusion":
        from diffusion.samplers import CONFIDENCES, SAMPLERS, ModelDenoiser, sample
        from diffusion.schedules import get_schedule

        if sampler not in SAMPLERS:
            raise ConfigError(f"sampler={sampler!r}; use one of {', '.join(SAMPLERS)}")
        if confidence not in CONFIDENCES:
            raise ConfigError(f"confidence={confidence!r}; use one of {', '.join(CONFIDENCES)}")
        denoiser = denoiser or ModelDenoiser(run.model)
        steps = steps or length - len(prefix)
        return sample(denoiser, sampler, n, length, steps, schedule=get_schedule(run.model_cfg.diffusion.schedule),
                      seed=seed, prefix=prefix, block_len=block_len, temperature=temperature, confidence=confidence,
                      cache=cache, progress=progress)
    from archs.sampling import ARSampler

    ar_sampler = ar_sampler or ARSampler(run.model)
    prompt_bt = np.broadcast_to(prefix, (n, len(prefix)))
    return ar_sampler.generate(prompt_bt, length - len(prefix), seed=seed, temperature=temperature,
                               max_len=length, progress=progress)


def detokenize(tokens) -> str:
    """Bytes as UTF-8 text; an EOD shows as a marker line (it ends one document, opens the next)."""
    out, buf = [], bytearray()
    for tok in np.asarray(tokens).tolist():
        if tok < 256:
            buf.append(tok)
            continue
        out.append(buf.decode("utf-8", errors="replace"))
        buf = bytearray()
        out.append("\n<|eod|>\n" if tok == EOD else f"<|{tok}|>")
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


def main(argv: list[str]) -> None:
    sc = parse_args(argv, SampleConfig)
    run = load_run(sc.root, sc.run)
    length = sc.length or int(run.cfg.train.seq_len)
    family = "masked diffusion" if run.model_cfg.objective == "diffusion" else "autoregressive"
    if family == "autoregressive" and sc.steps:
        print("note: autoregressive decoding takes one step per token; steps does not apply", file=sys.stderr)
    tokens, stats = generate(run, n=sc.n, length=length, steps=sc.steps, sampler=sc.sampler, prompt=sc.prompt,
                             seed=sc.seed, temperature=sc.temperature, block_len=sc.block_len,
                             confidence=sc.confidence, cache=sc.cache, progress=sc.progress)
    how = (f"{sc.sampler}, {stats['steps']} steps, {stats['nfe']} model calls" if family == "masked diffusion"
           else "KV-cache decoding")
    print(f"# {run.run_id} (step {run.step}, {family}; {how}; seed {sc.seed})")
    for i, row in enumerate(tokens):
        print(f"\n----- sample {i} ({len(row)} tokens) -----")
        print(detokenize(row[1:]))  # drop the leading EOD


if __name__ == "__main__":
    from sweeps.runtime import guarded, setup_runtime

    setup_runtime()
    guarded(main)(sys.argv[1:])
