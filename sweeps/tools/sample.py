"""Print samples from a trained checkpoint of either family.

    python -m sweeps.sample root=DIR run=ID steps=N [n=4] [length=0] [sampler=ancestral]
                            ['prompt="def "'] [temperature=1.0] [seed=0] [block_len=32]

`run` is a run id under ROOT/runs (a unique prefix is enough; empty: the newest done run).
Diffusion runs denoise `length` tokens in `steps` steps with the chosen sampler (ancestral |
remask | semiar); autoregressive runs decode token by token with their cache (`steps` does not
apply). Every sample starts with EOD, i.e. at the start of a document, followed by the
prompt's bytes when one is given. Settings: sweeps.config.SampleConfig.
"""

from __future__ import annotations

import dataclasses
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
from archs.sampling import ARSampler
from archs.sizes import resolve
from diffusion.block_sampler import INSIDE_SAMPLERS, block_sample
from diffusion.samplers import ModelDenoiser, sample
from diffusion.schedules import get_schedule
from sweeps.config import SampleConfig
from sweeps.engine.checkpoint import Checkpointer
from sweeps.config import DataConfig, DataName
from sweeps.engine.dataset import fit_vocab, manifest_tokenizer
from sweeps.engine.shards import read_manifest
from sweeps.engine.tokenizer import ByteTokenizer, decode
from sweeps.engine.plan import compute_dtype_for
from sweeps.engine.records import ResultsDB


# --- loading a trained run ---------------------------------------------------------------------


@dataclass
class LoadedRun:
    run_id: str
    cfg: object  # the run's composed config (OmegaConf)
    model_cfg: ModelConfig
    model: Model
    step: int
    row: dict | None
    tokenizer: object  # ByteTokenizer | BpeTokenizer (sweeps.engine.tokenizer); None: not text (data=mqar)

    def require_text(self) -> None:
        if self.tokenizer is None:
            raise ConfigError(f"run {self.run_id} trained on data=mqar, a recall probe whose ids are keys and "
                              "values, not text; choose a run trained on text (run=ID)")


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


def data_config_of(run_cfg) -> DataConfig:
    """The run's DataConfig, through the current schema."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), run_cfg.get("data", {})))


def model_config_of(run_cfg) -> ModelConfig:
    """The run's ModelConfig, through the current schema (fields added since get their defaults),
    with its data's vocabulary, computing in the dtype its arch.dtype means on this backend (auto:
    as training did here)."""
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), run_cfg.arch)
    mc = resolve(fit_vocab(OmegaConf.to_object(merged), data_config_of(run_cfg)))
    return dataclasses.replace(mc, dtype=compute_dtype_for(mc.dtype, jax.default_backend()))


def tokenizer_of(run_cfg):
    """The tokenizer of the run's data: the prepared directory's, none for the recall probe, else
    the byte tokenizer."""
    data = data_config_of(run_cfg)
    if data.name == DataName.mqar:
        return None
    if data.name == DataName.tokens:
        return manifest_tokenizer(Path(data.dir).expanduser(), read_manifest(data.dir))
    return ByteTokenizer()


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
    return LoadedRun(run_id, cfg, mc, nnx.merge(graphdef, abstract_state), step, ResultsDB(root).get(run_id),
                     tokenizer_of(cfg))


# --- sampling ----------------------------------------------------------------------------------


def prompt_tokens(prompt: str, tokenizer) -> np.ndarray:
    """EOD (start of a document) followed by the prompt's tokens."""
    ids = np.frombuffer(tokenizer.encode(prompt.encode()), tokenizer.dtype)
    return np.concatenate([[tokenizer.vocab.eod], ids]).astype(np.int32)


def generate(run: LoadedRun, *, n: int, length: int, steps: int, sampler: str = "ancestral", prompt: str = "",
             seed: int = 0, temperature: float = 1.0, block_len: int = 32, confidence: str = "prob",
             cache: bool = True, progress: bool = False, ar_sampler=None, denoiser=None):
    """Samples [n, length] (prefix included) and the sampler's stats."""
    prefix = prompt_tokens(prompt, run.tokenizer)
    if length <= len(prefix):
        raise ConfigError(f"length={length} leaves no room after the {len(prefix)}-token prefix; raise length")
    if run.model_cfg.objective == "block_diffusion":
        # Block by block with an exact KV cache over finished blocks (cache=false: recompute them);
        # `steps` denoising steps inside each block (0: one per token of the block).
        if sampler not in INSIDE_SAMPLERS:
            raise ConfigError(f"sampler={sampler!r}: block diffusion samples inside each block with one of "
                              f"{', '.join(INSIDE_SAMPLERS)}")
        tokens, stats = block_sample(
            run.model, n, length, steps or run.model_cfg.block_size, kv_cache=cache, sampler=sampler,
            schedule=get_schedule(run.model_cfg.diffusion.schedule), seed=seed, prefix=prefix,
            temperature=temperature, confidence=confidence, progress=progress)
        return tokens, {**stats, "steps": (steps or run.model_cfg.block_size) * stats["blocks"]}
    if run.model_cfg.objective == "diffusion":
        denoiser = denoiser or ModelDenoiser(run.model)
        steps = steps or length - len(prefix)
        return sample(denoiser, sampler, n, length, steps, schedule=get_schedule(run.model_cfg.diffusion.schedule),
                      seed=seed, prefix=prefix, block_len=block_len, temperature=temperature, confidence=confidence,
                      cache=cache, progress=progress)
    ar_sampler = ar_sampler or ARSampler(run.model)
    prompt_bt = np.broadcast_to(prefix, (n, len(prefix)))
    return ar_sampler.generate(prompt_bt, length - len(prefix), seed=seed, temperature=temperature,
                               max_len=length, progress=progress)


def detokenize(tokens, tokenizer) -> str:
    """The tokens' text as UTF-8; an EOD shows as a marker line (it ends one document, opens the
    next), other special tokens as <|id|>."""
    out, run = [], []
    eod, n_text = tokenizer.vocab.eod, tokenizer.vocab.n_text
    for tok in np.asarray(tokens).tolist():
        if tok < n_text:
            run.append(tok)
            continue
        out.append(decode(tokenizer.token_bytes, run).decode("utf-8", errors="replace"))
        run = []
        out.append("\n<|eod|>\n" if tok == eod else f"<|{tok}|>")
    out.append(decode(tokenizer.token_bytes, run).decode("utf-8", errors="replace"))
    return "".join(out)


def main(sc: SampleConfig) -> None:
    run = load_run(sc.root, sc.run)
    run.require_text()
    length = sc.length or int(run.cfg.train.seq_len)
    family = {"diffusion": "masked diffusion", "block_diffusion": "block diffusion"}.get(
        str(run.model_cfg.objective), "autoregressive")
    if family == "autoregressive" and sc.steps:
        print("note: autoregressive decoding takes one step per token; steps does not apply", file=sys.stderr)
    tokens, stats = generate(run, n=sc.n, length=length, steps=sc.steps, sampler=sc.sampler, prompt=sc.prompt,
                             seed=sc.seed, temperature=sc.temperature, block_len=sc.block_len,
                             confidence=sc.confidence, cache=sc.cache, progress=sc.progress)
    how = ("KV-cache decoding" if family == "autoregressive"
           else f"{sc.sampler}, {stats['steps']} steps, {stats['nfe']} model calls")
    print(f"# {run.run_id} (step {run.step}, {family}; {how}; seed {sc.seed})")
    for i, row in enumerate(tokens):
        print(f"\n----- sample {i} ({len(row)} tokens) -----")
        print(detokenize(row[1:], run.tokenizer))  # drop the leading EOD
