"""Train the MPT model with PyTorch FSDP2, one process or many (torchrun), and survive what goes
wrong: crashes (exact resume from the latest complete checkpoint), out-of-memory (halve the
micro-batch, keep the maths), loss spikes and non-finite values (skip, then roll back).

    python -m mptkernels.train CONFIG [key.sub=value ...] [--export DIR]
    torchrun --nproc_per_node N -m mptkernels.train CONFIG [...]

CONFIG is a YAML file, or the name of a preset shipped in mptkernels/configs/ (tiny, 125m, 1b:
the file's stem; a file of that name in the working directory wins). The config has the
sections below; every key has a default in DEFAULTS (``model:`` takes every MPTConfig field,
attn_config's keys included), an unknown key is an error naming it, and every value is checked
against its default's type and range. A bad config, data directory or run directory is a
one-line ``error: ...`` and exit status 2.
``--export DIR`` writes the latest checkpoint's model as a Hugging Face MPT directory (for
``from_hf`` / transformers) instead of training.

* Sharding: every block and the root are ``fully_shard``-ed (FSDP2) over all processes
  (``train.sharding: full``) or inside groups of ``train.shard_group_size`` processes,
  replicated across the groups (``hybrid``: a 2-D DeviceMesh), with a mixed-precision policy
  (``train.precision: bf16`` computes in bf16, keeps fp32 master weights and reduces gradients
  in fp32). CPU runs use gloo.
* A step: the global batch (``train.global_batch`` sequences) is a pure function of
  (data.seed, data step), split evenly over the processes and into micro-batches of
  ``train.micro_batch``; the loss is the sum of token losses over the global batch divided by
  its token count, so the maths do not depend on the number of processes or micro-batches.
* Checkpoints (``torch.distributed.checkpoint``, sharded): model, optimiser, schedule, data
  position, micro-batch and RNG state in ``RUN_DIR/ckpt-STEP``, every ``checkpoint.every``
  steps and at the end of the run, written to ``ckpt-STEP.tmp`` and renamed, then marked
  complete (with the model config); a directory without the mark is never taken as the
  latest, one that fails to load makes the run try the one before, and one of another model
  config is an error. With ``checkpoint.async: true`` the state is copied to CPU memory and
  written by a background thread (``torch.distributed.checkpoint.async_save``, its collectives
  on a gloo group of their own) while training goes on; the rename and the mark come only once
  every process has written its part (polled at each step, waited for before the next
  checkpoint, a rollback and the end of the run), so a crash mid-write leaves the previous
  checkpoint the newest complete one.
* Restarts: under ``torchrun --max-restarts N`` a failed process makes torchrun restart the
  group, which resumes from the newest complete checkpoint; each failure is recorded in
  ``RUN_DIR/failures/``, and when the last attempt fails too the run stops with a line naming
  the step and the cause. The first step of each process logs the time it took to get there
  (start-up, checkpoint load, data positioning).
* Loss spikes: a step whose loss or gradient norm is not finite, or whose loss exceeds
  ``spike.factor`` times the mean of the last ``spike.window`` steps, is skipped (no optimiser
  update), counted and logged; after ``spike.max_consecutive`` in a row the run reloads the
  last checkpoint and goes on with the data after the batch that caused it.
* Logging: one line per step on the console (loss, tokens/s, MFU, memory) and the same in
  ``RUN_DIR/log.jsonl``, one record per step of the run's history (a resume or a rollback drops
  the records of the steps it goes back over). Before the first step, a summary of the run
  (model and parameter count, data, processes and device, precision, the steps and tokens
  planned, the run directory, resumed or from scratch); after the last, what it did (steps,
  tokens, time, tokens/s, final loss) and the checkpoint with the command that exports it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import shutil
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist

from .models import MPTConfig, MPTForCausalLM

# our blocks return views of fused-op outputs and never modify them in place, which is what
# this FSDP2 warning is about
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

DEFAULTS = {
    # an MPTConfig (see mptkernels.models.mpt), or from_hf: DIR. Read from MPTConfig itself, so
    # every field it has (and only those) is a key; the sizes are the tiny preset's
    "model": {"from_hf": None, **dataclasses.asdict(MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                                                              vocab_size=256))},
    "data": {"path": None, "seq_len": 64, "seed": 0, "doc_attention": True},
    "train": {
        "steps": 100, "global_batch": 8, "micro_batch": 4, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 10,
        "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "precision": "fp32",
        "activation_checkpointing": False, "compile": False, "peak_tflops": None,
        # full: every parameter sharded over all processes; hybrid: sharded inside groups of
        # shard_group_size processes (default: the processes of a node) and replicated across them
        "sharding": "full", "shard_group_size": None,
        "device": "auto",  # auto: CUDA (one GPU per process) when available, else the CPU (gloo)
    },
    "checkpoint": {"dir": "runs/default", "every": 50, "keep": 2,
                   "async": False},  # true: written in the background while training goes on
    "spike": {"factor": 3.0, "window": 20, "max_consecutive": 3},
    "log": {"every": 1, "tensorboard": False, "wandb_project": None},
    # crash_at_step: SIGKILL at the start of that step (crash_rank: only that rank; crash_attempts:
    # only in torchrun's first N attempts); error_at_step: an uncaught RuntimeError there
    "test_hooks": {"oom_at_step": None, "nan_at_step": None, "crash_at_step": None, "crash_rank": None,
                   "crash_attempts": None, "error_at_step": None,
                   "async_write_delay_s": None},  # seconds each checkpoint write sleeps first (a slow disk)
}

# The keys that may be null, with the type of their other values. Every other key takes the
# type of its default (a default of None says nothing about the type).
_NULLABLE = {
    "model.from_hf": str, "model.logit_scale": float, "model.attn_config.clip_qkv": float,
    "model.attn_config.softmax_scale": float, "model.attn_config.kv_n_heads": int, "data.path": str,
    "train.grad_clip": float, "train.peak_tflops": float, "train.shard_group_size": int, "log.wandb_project": str,
    "test_hooks.oom_at_step": int, "test_hooks.nan_at_step": int, "test_hooks.crash_at_step": int,
    "test_hooks.crash_rank": int, "test_hooks.crash_attempts": int, "test_hooks.error_at_step": int,
    "test_hooks.async_write_delay_s": float,
}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class ConfigError(ValueError):
    """A bad config, data directory or run directory: ``main`` reports it as one line."""


PRESETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def presets() -> list:
    """The preset names: the stems of the YAML files in mptkernels/configs/ (shipped in the wheel)."""
    return sorted(name[:-len(".yaml")] for name in os.listdir(PRESETS_DIR) if name.endswith(".yaml"))


def config_path(config: str) -> str:
    """The file of a config argument: a preset's (tiny, 125m, 1b) unless a file of that name exists."""
    if os.path.exists(config) or config not in presets():
        return config
    return os.path.join(PRESETS_DIR, f"{config}.yaml")


# ------------------------------------------------------------------ config
def _check_value(where, value, current):
    """value as a value of key `where` (whose value so far is `current`): a float key takes an
    int or a numeric string (PyYAML reads 1e-3 as a string: YAML 1.1 wants 1.0e-3), an int key
    only an int; anything else is a ConfigError naming the key."""
    if value is None:
        if where in _NULLABLE:
            return None
        raise ConfigError(f"config: '{where}' cannot be null")
    if isinstance(current, list):  # train.betas: a list of numbers of a fixed length
        if not isinstance(value, list) or len(value) != len(current):
            raise ConfigError(f"config: '{where}' must be a list of {len(current)} numbers, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, c) for i, (v, c) in enumerate(zip(value, current))]
    if where == "model.logit_scale" and value == "inv_sqrt_d_model":  # MPT's one named scale
        return value
    typ = _NULLABLE.get(where, type(current))
    if typ is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))  # True is an int too
    if not ok:
        raise ConfigError(f"config: '{where}' must be {_EXPECTED[typ]}, got {value!r}")
    return value


def _merge(base: dict, over, path=""):
    """base updated with over, recursing into every mapping (so one key of model.attn_config
    keeps the others); each key must exist in base and each value is checked (_check_value)."""
    if over is None:  # an empty section in YAML (`train:`)
        over = {}
    if not isinstance(over, dict):
        raise ConfigError(f"config: '{path[:-1]}' must be a mapping of keys, got {type(over).__name__}")
    out = copy.deepcopy(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if k not in base:
            raise ConfigError(f"config: unknown key '{where}' (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict):
            out[k] = _merge(base[k], v, where + ".")
        else:
            out[k] = _check_value(where, v, base[k])
    return out


def load_config(path=None, overrides=()) -> dict:
    """DEFAULTS <- the YAML file (or preset) <- key.sub=value overrides (values parsed as YAML),
    checked; any problem is a ConfigError naming the file or key."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        path = config_path(path)
        try:
            with open(path) as fh:
                doc = yaml.safe_load(fh)
        except FileNotFoundError as e:
            raise ConfigError(f"config file {path}: {e.strerror}, nor a preset ({', '.join(presets())})") from e
        except OSError as e:
            raise ConfigError(f"config file {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(doc, (dict, type(None))):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                              f"({', '.join(DEFAULTS)}), got a {type(doc).__name__}")
        cfg = _merge(cfg, doc)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        node: dict = {}
        leaf = node
        parts = key.split(".")
        for p in parts[:-1]:
            leaf[p] = {}
            leaf = leaf[p]
        try:
            leaf[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"config override '{item}': the value is not valid YAML") from e
        cfg = _merge(cfg, node)
    _check_ranges(cfg)
    return cfg


def _check_ranges(cfg):
    """What the types do not say: ranges, choices, the required data.path, and the model config
    (built here, so MPTConfig's own checks report as config errors too)."""
    def need(where, ok, what):
        if not ok:
            section, key = where.split(".", 1)
            raise ConfigError(f"config: '{where}' must be {what}, got {cfg[section][key]!r}")

    t, d, ck, sp = cfg["train"], cfg["data"], cfg["checkpoint"], cfg["spike"]
    need("train.steps", t["steps"] >= 1, ">= 1")
    need("train.global_batch", t["global_batch"] >= 1, ">= 1")
    need("train.micro_batch", t["micro_batch"] >= 1, ">= 1")
    need("train.warmup_steps", t["warmup_steps"] >= 0, ">= 0")
    need("train.lr", t["lr"] >= 0, ">= 0")
    need("train.min_lr_ratio", 0 <= t["min_lr_ratio"] <= 1, "in [0, 1]")
    need("train.weight_decay", t["weight_decay"] >= 0, ">= 0")
    need("train.betas", all(0 <= b < 1 for b in t["betas"]), "two numbers in [0, 1)")
    need("train.grad_clip", t["grad_clip"] is None or t["grad_clip"] >= 0, ">= 0 (0 or null: no clipping)")
    need("train.precision", t["precision"] in ("fp32", "bf16"), "fp32 or bf16")
    need("train.device", t["device"] in ("auto", "cpu", "cuda"), "auto, cpu or cuda")
    need("train.peak_tflops", t["peak_tflops"] is None or t["peak_tflops"] > 0, "> 0 or null")
    need("train.sharding", t["sharding"] in ("full", "hybrid"), "full or hybrid")
    need("train.shard_group_size", t["shard_group_size"] is None or t["shard_group_size"] >= 1,
         ">= 1 or null (null: the processes of a node)")
    need("data.path", d["path"] is not None, "a directory from `python -m mptkernels.data prepare`")
    need("data.seq_len", d["seq_len"] >= 2, ">= 2 (a token and the one it predicts)")
    need("checkpoint.every", ck["every"] >= 0, ">= 0 (0: no checkpoints)")
    need("checkpoint.keep", ck["keep"] >= 1, ">= 1 (the newest checkpoints kept; the one just written is one)")
    need("spike.factor", sp["factor"] > 0, "> 0")
    need("spike.window", sp["window"] >= 1, ">= 1")
    need("spike.max_consecutive", sp["max_consecutive"] >= 1, ">= 1")
    need("log.every", cfg["log"]["every"] >= 1, ">= 1")
    # the optional loggers' packages, checked before anything is created
    for key, package in (("tensorboard", "tensorboard"), ("wandb_project", "wandb")):
        if cfg["log"][key] and importlib.util.find_spec(package) is None:
            raise ConfigError(f"config: 'log.{key}' needs the {package} package (pip install {package})")
    for k, v in cfg["test_hooks"].items():
        need(f"test_hooks.{k}", v is None or v >= 0, ">= 0 or null")
    if not cfg["model"]["from_hf"]:  # a from_hf model is checked when it is read (build_model)
        model_config(cfg)


def model_config(cfg) -> MPTConfig:
    """The MPTConfig of cfg["model"] (without from_hf); MPTConfig's errors as ConfigErrors."""
    m = {k: v for k, v in cfg["model"].items() if k != "from_hf"}
    # sizes and dropout probabilities, named as config keys ('model.n_heads'); MPTConfig checks
    # them too, in its own words, for users of the Python API
    for k, v in [*m.items(), *(("attn_config." + a, b) for a, b in m["attn_config"].items())]:
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ConfigError(f"config: 'model.{k}' must be >= 1, got {v}")
        if k.endswith("pdrop") and not 0 <= v < 1:
            raise ConfigError(f"config: 'model.{k}' must be in [0, 1), got {v}")
    try:
        return MPTConfig(**m)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from e


# ------------------------------------------------------------------ distributed setup
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(want="auto"):
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: 'train.device' is cuda but this machine has no CUDA device")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts one key-value store for all the attempts of a run: the keys of
        # this attempt's process group under their own prefix, or a restarted group's gloo may
        # read the addresses of the attempt that died and fail to connect ("Connection refused")
        env = os.environ
        base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["WORLD_SIZE"]), is_master=False)
        store = dist.PrefixStore(f"mptkernels/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", base)
        dist.init_process_group(backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]))
    elif "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:  # one process without torchrun: a group of one, so every code path is the same
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    return device, dist.get_rank(), dist.get_world_size()


def _print(*a, **k):
    if dist.get_rank() == 0:
        print(*a, **k, flush=True)


def shard_mesh(cfg, device):
    """The DeviceMesh FSDP2 shards over: 1-D over all processes (train.sharding full), or 2-D
    (replicate, shard) for hybrid sharding: parameters sharded inside each group of
    train.shard_group_size consecutive ranks, replicated across the groups (llm-foundry's
    HYBRID_SHARD: the all-gathers and reduce-scatters stay inside a node, and only one
    all-reduce of the gradient shards crosses nodes)."""
    from torch.distributed.device_mesh import init_device_mesh

    t, world = cfg["train"], dist.get_world_size()
    if t["sharding"] == "full":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    group = t["shard_group_size"] or int(os.environ.get("LOCAL_WORLD_SIZE", world))  # torchrun's processes per node
    if world % group:
        raise ConfigError(f"config: 'train.shard_group_size' ({group}) must divide the number of processes ({world})")
    return init_device_mesh(device.type, (world // group, group), mesh_dim_names=("replicate", "shard"))


# ------------------------------------------------------------------ model, optimiser, schedule
def build_model(cfg, device):
    """The configured model (model.from_hf's or a fresh one from the model keys), FSDP2-sharded."""
    src = cfg["model"]["from_hf"]
    try:
        if src:  # the HF directory's config.json decides the model; the other model keys are not used
            model = MPTForCausalLM.from_hf(src)
        else:
            torch.manual_seed(cfg["train"]["seed"])
            model = MPTForCausalLM(model_config(cfg))
    except (OSError, ValueError) as e:  # a bad directory, or a config the modules reject
        raise ConfigError(f"model{'.from_hf' if src else ''}: {e}") from e
    model.to(device)
    if cfg["train"]["activation_checkpointing"]:
        from torch.utils.checkpoint import checkpoint

        for block in model.transformer.blocks:
            block._orig_forward = block.forward
            block.forward = lambda *a, _b=block, **k: checkpoint(_b._orig_forward, *a, use_reentrant=False, **k)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # cast_forward_inputs=False: by default FSDP2 casts every floating-point argument of a
    # block to bf16, the ALiBi slopes too (the attention op rejects bf16 slopes; the rotary
    # tables are buffers of the RotaryEmbedding the block gets, which FSDP2 never casts). The hidden
    # states need no cast: they come out of the root's embedding, whose weight is already bf16 in the forward.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
          if cfg["train"]["precision"] == "bf16" else MixedPrecisionPolicy())
    mesh = shard_mesh(cfg, device)
    for block in model.transformer.blocks:
        if cfg["train"]["compile"]:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _lr_lambda(t):
    warm, total, floor = t["warmup_steps"], t["steps"], t["min_lr_ratio"]

    def f(step):
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model, cfg, device):
    t = cfg["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["betas"]), weight_decay=t["weight_decay"],
                            fused=device.type == "cuda")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(t))


# ------------------------------------------------------------------ checkpoints
def _ckpts(run_dir):
    """Complete checkpoints, newest first; warns about the incomplete ones it skips."""
    if not os.path.isdir(run_dir):
        return []
    out = []
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if not name.startswith("ckpt-") or not os.path.isdir(path):
            continue
        if name.endswith(".tmp") or not os.path.exists(os.path.join(path, "complete.json")):
            if dist.get_rank() == 0:
                warnings.warn(f"train: ignoring the incomplete checkpoint {path}")
            continue
        out.append((int(name.split("-")[1]), path))
    return [p for _, p in sorted(out, reverse=True)]


def _model_record(model) -> dict:
    """The model's config as it reads back from JSON (what complete.json records)."""
    return json.loads(json.dumps(dataclasses.asdict(model.config)))


def _writer(path, delay_s=None):
    """dcp's FileSystemWriter of `path` that notes when this process's files are written
    (``.written``, time.perf_counter()); with delay_s, its write first sleeps that long (a slow
    disk: test_hooks.async_write_delay_s, so that tests can kill a run mid-write)."""
    from torch.distributed.checkpoint import FileSystemWriter

    class Writer(FileSystemWriter):
        written = None

        def write_data(self, plan, planner):
            if delay_s:
                time.sleep(delay_s)
            done = super().write_data(plan, planner)  # FileSystemWriter writes before it returns
            self.written = time.perf_counter()
            return done

    return Writer(path)


@dataclasses.dataclass
class _PendingSave:
    """A checkpoint whose files are being written to `tmp` (every process writes its shards)."""
    step: int
    tmp: str
    final: str
    model: dict  # _model_record, for complete.json
    future: object  # this process's save: a concurrent.futures.Future
    writer: object  # _writer's: .written
    started: float  # time.perf_counter() when the save began


def start_checkpoint(run_dir, step, model, opt, sched, state, group=None, write_delay_s=None) -> _PendingSave:
    """Begins writing checkpoint `step` to ``ckpt-STEP.tmp``: with a checkpoint process group
    (checkpoint.async) in a background thread from a copy in CPU memory, so the caller may change
    the parameters at once; without, to the end before it returns. finish_checkpoint completes it."""
    import concurrent.futures

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = os.path.join(run_dir, f"ckpt-{step:08d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    msd, osd = get_state_dict(model, opt)
    extra = {"meta": torch.tensor(list(json.dumps({**state, "sched": sched.state_dict()}).encode()), dtype=torch.uint8),
             "rng": torch.get_rng_state()}
    sd, writer, t0 = {"model": msd, "optim": osd, **extra}, _writer(tmp, write_delay_s), time.perf_counter()
    if group is None:
        dcp.save(sd, storage_writer=writer)
        future = concurrent.futures.Future()
        future.set_result(None)
    else:
        # the writer stages (a BlockingAsyncStager): a fresh CPU copy of every tensor before async_save returns
        future = dcp.async_save(sd, storage_writer=writer, process_group=group)
    return _PendingSave(step, tmp, final, _model_record(model), future, writer, t0)


def finish_checkpoint(pending: _PendingSave, run_dir, keep) -> float:
    """Waits until every process has written its part of `pending`, then renames it to
    ``ckpt-STEP``, marks it complete and prunes the checkpoints beyond the newest `keep`.
    Every process calls it at the same point. Returns the seconds this process's write took."""
    pending.future.result()  # a failed write raises here
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(pending.final, ignore_errors=True)
        os.replace(pending.tmp, pending.final)
        with open(os.path.join(pending.final, "complete.json"), "w") as fh:
            json.dump({"step": pending.step, "model": pending.model}, fh)
        for old in _ckpts(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return pending.writer.written - pending.started


class _Checkpoints:
    """The run's checkpoints, written one at a time: each process calls every method at the same
    point of the loop. With checkpoint.async a checkpoint is finished (finish_checkpoint) at the
    first poll that finds every process's write done, or when the next save, a rollback or the
    end of the run needs it (wait); without, save finishes it at once."""

    def __init__(self, cfg, device):
        ck = cfg["checkpoint"]
        self.run_dir, self.keep, self.device = ck["dir"], ck["keep"], device
        self.delay_s = cfg["test_hooks"]["async_write_delay_s"]
        # dcp's own collectives (the save plan, the metadata) run in the writer's thread: on a
        # gloo group of their own, created once, they never interleave with the training's
        self.group = dist.new_group(backend="gloo") if ck["async"] and ck["every"] else None
        self.pending = None

    def save(self, step, model, opt, sched, state):
        """Starts checkpoint `step` (after finishing the one before); returns the seconds the
        write of the checkpoint it finished took, or None."""
        written = self.wait()
        self.pending = start_checkpoint(self.run_dir, step, model, opt, sched, state, self.group, self.delay_s)
        return self.wait() if self.group is None else written

    def poll(self):
        """Finishes the pending checkpoint if every process has written its part: one tiny
        all_reduce on the training's group while one is pending (the checkpoint group is busy in
        the writer's thread; the training group is this thread's, in the same order on every
        process). Returns what save returns."""
        if self.pending is None:
            return None
        done = torch.tensor([int(self.pending.future.done())], device=self.device)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.wait() if done.item() else None

    def wait(self):
        """Finishes the pending checkpoint, if any, waiting for its write; returns what save returns."""
        pending, self.pending = self.pending, None
        return None if pending is None else finish_checkpoint(pending, self.run_dir, self.keep)


def _reader(path):
    """dcp's FileSystemReader of `path` that counts the bytes this process reads (``.read``):
    the stored pieces overlapping the shards it holds, each read whole."""
    from torch.distributed.checkpoint import FileSystemReader

    class Reader(FileSystemReader):
        read = 0

        def read_data(self, plan, planner):
            self.read += sum(self.storage_data[item.storage_index].length for item in plan.items)
            return super().read_data(plan, planner)

    return Reader(path)


def load_checkpoint(path, model, opt, sched, stats=None):
    """Loads checkpoint `path` into model, opt and sched; returns its state (step, data position,
    ...). ``stats`` (a dict), when given, gets ``read_bytes``: what this process read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    reader = _reader(path)
    md = reader.read_metadata()
    state = {"model": msd, "optim": osd, "meta": torch.zeros(md.state_dict_metadata["meta"].size, dtype=torch.uint8),
             "rng": torch.get_rng_state()}
    dcp.load(state, storage_reader=reader)
    if stats is not None:
        stats["read_bytes"] = reader.read
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads(bytes(state["meta"].tolist()).decode())
    sched.load_state_dict(meta.pop("sched"))
    torch.set_rng_state(state["rng"])
    return meta


def _model_diff(saved: dict, now: dict, path="") -> list:
    """'key: A in the checkpoint, B configured' for every field that differs."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _model_diff(a, b, f"{path}{k}.")
        elif a != b:
            out.append(f"model.{path}{k}: {a!r} in the checkpoint, {b!r} configured")
    return out


def resume(run_dir, model, opt, sched, stats=None) -> tuple:
    """Loads the newest complete checkpoint that loads: (its path, its state), or (None, None)
    when there is none. A damaged one is skipped with a warning; a checkpoint of another model
    config, or a directory where none loads, is a ConfigError (training from scratch next to
    them would silently discard the run)."""
    from torch.distributed.checkpoint.api import CheckpointException

    ckpts = _ckpts(run_dir)
    failed = []
    for path in ckpts:
        try:
            with open(os.path.join(path, "complete.json")) as fh:
                saved = json.load(fh).get("model")  # absent in checkpoints written before it was recorded
            diff = [] if saved is None else _model_diff(saved, _model_record(model))
            if not diff:
                return path, load_checkpoint(path, model, opt, sched, stats)
        # CheckpointException (what a damaged checkpoint raises) derives from BaseException
        except (Exception, CheckpointException) as e:
            failed.append(f"{path}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            if dist.get_rank() == 0:
                warnings.warn(f"train: cannot load {failed[-1]}; trying an older one")
            continue
        raise ConfigError(f"checkpoint.dir: {path} does not match the configured model ({'; '.join(diff)}); "
                          "configure the checkpoint's model or use another checkpoint.dir")
    if failed:
        raise ConfigError(f"checkpoint.dir: none of the {len(failed)} checkpoints in {run_dir} loads "
                          f"(newest: {failed[0]}); move them away to start afresh")
    return None, None


def _truncate_log(log_path, step):
    """Keeps the records of steps <= step in log.jsonl: the steps after it are about to be run
    again (resume, rollback), and a half-written last line (a killed run) goes too."""
    if not os.path.exists(log_path):
        return
    keep = []
    with open(log_path) as fh:
        for line in fh:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    with open(log_path + ".tmp", "w") as fh:
        fh.writelines(keep)
    os.replace(log_path + ".tmp", log_path)


# ------------------------------------------------------------------ restarts (torchrun --max-restarts)
class _Stopped(Exception):
    """SIGTERM: torchrun stops the group when another process failed (or a scheduler stops the job)."""


class _Attempts:
    """What torchrun's elastic restarts need from us beyond resuming: a record of each failed
    attempt (RUN_DIR/failures/RUNID-ATTEMPT-RANK.json: the step and the cause, written by every
    process that sees the failure, the killed one excepted), so that the next attempt says what
    happened and the last one, when it fails too, stops with the step and the cause named.
    torchrun numbers the attempts (TORCHELASTIC_RESTART_COUNT, 0 first) of a run id
    (TORCHELASTIC_RUN_ID, --rdzv-id); outside torchrun there is one attempt."""

    def __init__(self, run_dir, rank):
        self.dir = os.path.join(run_dir, "failures")
        self.rank = rank
        self.run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        self.attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        self.max_restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
        self.step = None  # the step being run: set by the loop

    def _files(self):
        prefix = f"{self.run_id}-"
        return sorted(os.path.join(self.dir, f) for f in os.listdir(self.dir) if f.startswith(prefix)) \
            if os.path.isdir(self.dir) else []

    def begin(self):
        """A new torchrun invocation under the same run id (a scheduler's requeue) starts a new history."""
        if self.attempt == 0 and self.rank == 0:
            for f in self._files():
                os.remove(f)

    def history(self) -> dict:
        """attempt -> (step, cause) of the earlier attempts of this run id: the first process's
        record of each (the lowest rank that wrote one: with a process killed, what the others saw)."""
        out = {}
        for f in self._files():
            try:
                with open(f) as fh:
                    rec = json.load(fh)
            except (OSError, ValueError):
                continue
            if rec["attempt"] < self.attempt and (rec["attempt"] not in out or rec["rank"] < out[rec["attempt"]][2]):
                out[rec["attempt"]] = (rec["step"], rec["cause"], rec["rank"])
        return {a: v[:2] for a, v in sorted(out.items())}

    def describe(self) -> str:
        """The start summary's line for a restarted attempt ('' for the first)."""
        if self.attempt == 0:
            return ""
        past = "; ".join(f"attempt {a + 1} failed at step {s}: {c}" for a, (s, c) in self.history().items())
        return f"{self.attempt + 1} of {self.max_restarts + 1} (torchrun --max-restarts {self.max_restarts}); {past}"

    def failed(self, exc) -> str:
        """Records this process's failure; returns the message to print when no restart is left."""
        cause = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"{self.run_id}-{self.attempt}-{self.rank}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump({"attempt": self.attempt, "rank": self.rank, "step": self.step, "cause": cause}, fh)
        os.replace(path + ".tmp", path)
        if self.max_restarts == 0 or self.attempt < self.max_restarts:
            return ""  # torchrun restarts the group (or no torchrun restarts at all: the traceback says it)
        steps = [s for s, _ in self.history().values()] + [self.step]
        where = (f"step {self.step} failed in all {len(steps)} attempts" if len(set(steps)) == 1 else
                 f"attempts failed at steps {', '.join(map(str, steps))}")
        return (f"error: out of restarts (torchrun --max-restarts {self.max_restarts}): {where}; "
                f"the last failure (rank {self.rank}): {cause}. The run stops; the newest complete "
                "checkpoint is kept: fix the cause and start the run again")


_IMPORTED = time.time()  # _process_start's fallback


def _process_start() -> float:
    """The wall-clock time this process started (Linux: /proc; elsewhere: when this module was imported)."""
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the command name
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def _raise_stopped(signum, frame):
    raise _Stopped("SIGTERM (torchrun stops the group when another process failed; its log names that process)")


# ------------------------------------------------------------------ the training loop
class _InjectedOOM(torch.OutOfMemoryError):
    pass


def _memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return float("nan")


def _open_data(cfg):
    """The TokenDataset of data.path, or a ConfigError saying what is wrong with it."""
    from .data import TokenDataset

    path, seq = cfg["data"]["path"], cfg["data"]["seq_len"]
    if not os.path.isfile(os.path.join(path, "meta.json")):
        raise ConfigError(f"data.path: no meta.json in {path!r} (expected a directory from "
                          "`python -m mptkernels.data prepare`)")
    try:
        data = TokenDataset(path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"data.path: cannot read {path}: {type(e).__name__}: {e}") from e
    if data.windows(seq) < 1:
        raise ConfigError(f"data.seq_len ({seq}) is more than the {len(data)} tokens in {path}")
    return data


def _check_fits(model_cfg, cfg, data):
    """The data and data.seq_len fit the model (known only once a from_hf model is read)."""
    seq = cfg["data"]["seq_len"]
    if seq > model_cfg.max_seq_len:
        raise ConfigError(f"data.seq_len ({seq}) must be <= model.max_seq_len ({model_cfg.max_seq_len})")
    # a larger model vocabulary is fine (padded vocabularies are common); a smaller one would
    # index past the embedding
    if data.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"data.path: the data's tokenizer has {data.vocab_size} tokens (meta.json vocab_size) but "
                          f"model.vocab_size is {model_cfg.vocab_size}; use data prepared for this model's vocabulary")


def train(cfg, export_command=None) -> list:
    """Runs (or resumes) training as configured; returns the logged records of this process.
    Process 0 prints a summary of the run before the first step and after the last;
    ``export_command`` (the words of a command line) is the export command the last one shows
    (default: the Python call, ``export_hf(cfg, DIR)``)."""
    import signal
    import threading

    data = _open_data(cfg)  # before the process group: a bad data.path needs no teardown
    device, rank, world = _init_distributed(cfg["train"]["device"])
    attempts = _Attempts(cfg["checkpoint"]["dir"], rank)
    # a handler only where Python allows one (the main thread; train() may be called from another)
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_stopped) if main else None
    try:
        records = _train(cfg, device, rank, world, data, attempts, export_command)
        # every process done before the group goes away: a gloo process group torn down while
        # a peer is still in its last collective aborts that peer
        dist.barrier()
        return records
    except ConfigError:
        raise
    except BaseException as e:  # recorded for the next attempt, or named when none is left
        if attempts.step is not None:
            message = attempts.failed(e)
            if message:
                print(message, file=sys.stderr, flush=True)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, old_term)
        dist.destroy_process_group()


def _train(cfg, device, rank, world, data, attempts, export_command=None):
    t, ck, sp, hooks = cfg["train"], cfg["checkpoint"], cfg["spike"], cfg["test_hooks"]
    seq = cfg["data"]["seq_len"]
    if t["global_batch"] % world:
        raise ConfigError(f"train.global_batch ({t['global_batch']}) must be a multiple of the {world} processes")
    per_rank = t["global_batch"] // world
    model = build_model(cfg, device)
    _check_fits(model.config, cfg, data)
    opt, sched = build_optimizer(model, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    state = {"step": 0, "data_step": 0, "micro_batch": min(t["micro_batch"], per_rank), "skipped": 0,
             "recent": [], "consecutive": 0, "oom_done": False}
    run_dir = ck["dir"]
    # how long a (re)start takes before its first new step: start-up (interpreter, imports,
    # process group, model, optimiser), checkpoint load, data positioning (the first batch)
    timing = {"startup_s": time.time() - _process_start()}
    t0 = time.perf_counter()
    stats = {"read_bytes": 0}
    path, loaded = resume(run_dir, model, opt, sched, stats)
    timing["load_s"] = time.perf_counter() - t0
    timing["load_mb"] = stats["read_bytes"] / 2**20  # this process's part of the checkpoint
    if path:
        state.update(loaded)
    attempts.begin()
    _print(_start_summary(cfg, model.config, n_params, data, device, world, state, path,
                          next(model.parameters()).device_mesh, attempts.describe()))
    saved_step = state["step"]  # the step of the newest checkpoint (0: none)
    ckpts = _Checkpoints(cfg, device)
    if state["step"] >= t["steps"]:
        _print(f"nothing to do: the run is at step {state['step']} and train.steps is {t['steps']}")
    log_path = os.path.join(run_dir, "log.jsonl")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        _truncate_log(log_path, state["step"])
    sinks = _log_sinks(cfg, run_dir) if rank == 0 else []
    records = []
    t_start = time.perf_counter()
    while state["step"] < t["steps"]:
        step, dstep = state["step"], state["data_step"]
        attempts.step = step
        if (step == hooks["crash_at_step"] and hooks["crash_rank"] in (None, rank)
                and (hooks["crash_attempts"] is None or attempts.attempt < hooks["crash_attempts"])):
            os.kill(os.getpid(), 9)  # a node dying mid-run (tests)
        if step == hooks["error_at_step"]:
            raise RuntimeError("injected by test_hooks.error_at_step")
        # this process's rows of the global batch, read without the other processes' windows
        t0 = time.perf_counter()
        tokens, doc_ids = data.batch(dstep, t["global_batch"], seq, seed=cfg["data"]["seed"],
                                     rows=range(rank * per_rank, (rank + 1) * per_rank))
        tokens = tokens.to(device)
        doc_ids = doc_ids.to(device) if cfg["data"]["doc_attention"] else None
        if timing is not None:
            timing.setdefault("data_s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            loss_sum, n_tok = _step_grads(model, tokens, doc_ids, state["micro_batch"], world,
                                          inject_oom=hooks["oom_at_step"] == step and not state["oom_done"])
        except torch.OutOfMemoryError as e:
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if state["micro_batch"] == 1:
                raise RuntimeError("train: out of memory with micro_batch 1; use a smaller model or seq_len") from e
            state["micro_batch"] //= 2
            state["oom_done"] = state["oom_done"] or isinstance(e, _InjectedOOM)
            _print(f"step {step}: out of memory; micro_batch -> {state['micro_batch']} "
                   f"(gradient accumulation {per_rank // state['micro_batch']}), retrying the step")
            records.append({"step": step, "event": "oom", "micro_batch": state["micro_batch"]})
            continue
        loss = loss_sum / n_tok
        if hooks["nan_at_step"] is not None and dstep == hooks["nan_at_step"]:
            loss = loss * float("nan")  # a poisoned batch (tests): keyed on the data step, as bad data is
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or float("inf"))
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        loss_v = float(loss)
        recent = state["recent"]
        spike = (not math.isfinite(loss_v) or not math.isfinite(gnorm)
                 or (len(recent) >= sp["window"] and loss_v > sp["factor"] * sum(recent) / len(recent)))
        state["data_step"] = dstep + 1
        if spike:
            opt.zero_grad(set_to_none=True)
            state["skipped"] += 1
            state["consecutive"] += 1
            rec = {"step": step, "data_step": dstep, "event": "skipped", "loss": loss_v, "grad_norm": gnorm,
                   "skipped_total": state["skipped"]}
            records.append(rec)
            _print(f"step {step}: loss {loss_v:.4g}, grad norm {gnorm:.4g}: skipped ({state['skipped']} so far)")
            if state["consecutive"] >= sp["max_consecutive"]:
                ckpts.wait()  # the newest checkpoint complete, so that it is the one taken
                resume_data, skipped = state["data_step"], state["skipped"]
                path, loaded = resume(run_dir, model, opt, sched)
                if path:
                    state.update(loaded)
                    # on past the bad data; the skipped steps still count
                    state["data_step"], state["consecutive"], state["skipped"] = resume_data, 0, skipped
                    if rank == 0:
                        _truncate_log(log_path, state["step"])
                    _print(f"{sp['max_consecutive']} bad steps in a row: rolled back to {path}, "
                           f"going on from data step {resume_data}")
                    records.append({"step": state["step"], "event": "rollback", "checkpoint": path})
            continue
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state["consecutive"] = 0
        state["recent"] = (recent + [loss_v])[-sp["window"]:]
        state["step"] = step + 1
        dt = time.perf_counter() - t0
        tps = t["global_batch"] * seq / dt
        mfu = (6 * n_params * tps / (t["peak_tflops"] * 1e12 * world)) if t["peak_tflops"] else None
        rec = {"step": step + 1, "loss": loss_v, "grad_norm": gnorm, "lr": sched.get_last_lr()[0],
               "tokens_per_s": tps, "mfu": mfu, "memory_mb": _memory_mb(device),
               "micro_batch": state["micro_batch"], "skipped_total": state["skipped"]}
        if timing is not None:  # the first step of this process: what it took to get here
            rec.update(timing, step_s=dt, first_step_after_s=time.time() - _process_start())
            _print(f"first step done {rec['first_step_after_s']:.1f} s after the process started: start-up "
                   f"{timing['startup_s']:.1f} s, checkpoint load {timing['load_s']:.2f} s "
                   f"({timing['load_mb']:.1f} MB), data positioning {timing['data_s'] * 1e3:.1f} ms, "
                   f"the step {dt:.2f} s")
            timing = None
        t_ck = time.perf_counter()
        written = ckpts.poll()
        if ck["every"] and state["step"] % ck["every"] == 0:
            written = ckpts.save(state["step"], model, opt, sched, state) or written
            saved_step = state["step"]
            rec["checkpoint_s"] = time.perf_counter() - t_ck  # the time the loop was held by it
        if written is not None:  # a checkpoint was finished at this step: its write took this long
            rec["checkpoint_write_s"] = written
        records.append(rec)
        if rank == 0:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
            for sink in sinks:
                sink(rec)
            if (step + 1) % cfg["log"]["every"] == 0:
                bar = int(30 * (step + 1) / t["steps"])
                print(f"[{'#' * bar}{'.' * (30 - bar)}] step {step + 1}/{t['steps']} loss {loss_v:.4f} "
                      f"{tps:,.0f} tok/s" + (f" MFU {mfu:.1%}" if mfu else "") +
                      f" mem {rec['memory_mb']:.0f} MB", flush=True)
    if ck["every"] and state["step"] != saved_step:  # the last steps too: --export takes the newest
        ckpts.save(state["step"], model, opt, sched, state)
    ckpts.wait()  # the last checkpoint complete before the run returns
    _print(_end_summary(cfg, records, state, time.perf_counter() - t_start, export_command))
    return records


# ------------------------------------------------------------------ the summaries of a run
_KEY = 12  # the width of the summaries' first column


def _block(title, rows):
    return "\n".join([title, *(f"  {k:<{_KEY}}{v}" for k, v in rows)])


def _count(n) -> str:
    """1,234,567 (1.23 M): exact, and readable at a glance."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.3g} {unit})"
    return f"{n:,}"


def _sharding(mesh) -> str:
    """How the parameters are spread ('' for one process)."""
    if mesh.size() == 1:
        return ""
    if mesh.ndim == 1:
        return "fully sharded, "
    groups, size = mesh.shape
    return f"hybrid sharding: {groups} groups of {size} (sharded inside, replicated across), "


def _start_summary(cfg, mc, n_params, data, device, world, state, resumed_from, mesh, attempt="") -> str:
    t, d, ck = cfg["train"], cfg["data"], cfg["checkpoint"]
    seq, batch = d["seq_len"], t["global_batch"]
    src = f"from_hf {cfg['model']['from_hf']}: " if cfg["model"]["from_hf"] else ""
    if device.type == "cuda":
        where = f"cuda, one GPU each ({torch.cuda.get_device_name(device)}; nccl)"
    else:
        n = torch.get_num_threads()
        where = f"the CPU ({n} thread{'s' if n > 1 else ''}{' each' if world > 1 else ''}; gloo)"
    precision = ("bf16 compute, fp32 master weights and gradient reduction" if t["precision"] == "bf16" else "fp32")
    options = [name for key, name in (("activation_checkpointing", "activation checkpointing"),
                                      ("compile", "torch.compile per block")) if t[key]]
    planned = t["steps"] * batch * seq
    docs = data.meta.get("n_docs")
    return _block("training", [
        ("model", f"{src}d_model {mc.d_model}, n_layers {mc.n_layers}, n_heads {mc.n_heads}, "
                  f"vocab {mc.vocab_size}: {_count(n_params)} parameters"),
        ("data", f"{d['path']}: {_count(len(data))} tokens" + (f" in {docs:,} documents" if docs else "")
                 + f" (tokenizer {data.meta.get('tokenizer', '?')})"),
        ("processes", f"{world} process{'es' if world > 1 else ''} on {where}, {_sharding(mesh)}"
                      f"micro-batch {state['micro_batch']}"),  # a checkpoint's, after an out-of-memory
        ("precision", ", ".join([precision, *options])),
        ("plan", f"{t['steps']:,} steps × {batch} sequences × {seq} tokens = {planned:,} tokens "
                 f"({planned / len(data):.2g} epochs)"),
        ("run dir", f"{ck['dir']} (" + (f"a checkpoint every {ck['every']} steps, the newest {ck['keep']} kept)"
                                        if ck["every"] else "checkpoint.every 0: no checkpoints)")),
        ("start", f"resumed from {resumed_from} at step {state['step']} "
                  f"({max(0, t['steps'] - state['step']):,} steps to go)"
                  if resumed_from else "from scratch"),
        *([("attempt", attempt)] if attempt else []),
    ])


def _end_summary(cfg, records, state, seconds, export_command) -> str:
    t, ck = cfg["train"], cfg["checkpoint"]
    losses = [r["loss"] for r in records if "event" not in r]  # the steps of this run that updated the model
    tokens = len(losses) * t["global_batch"] * cfg["data"]["seq_len"]
    skipped = sum(r.get("event") == "skipped" for r in records)
    if losses:
        did = f"{len(losses):,} steps, {tokens:,} tokens in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s)"
    else:
        did = "no steps" + ("" if skipped else " (the run was already at train.steps)")
    rows = [("this run", did + (f", {skipped} skipped" if skipped else ""))]
    last = losses[-10:]
    if last:
        rows.append(("final loss", f"{sum(last) / len(last):.4f} (mean of the last {len(last)} steps)"))
    if ck["every"]:
        out = os.path.join(ck["dir"], "hf")
        rows.append(("checkpoint", os.path.join(ck["dir"], f"ckpt-{state['step']:08d}")))
        rows.append(("export", shlex.join([*export_command, "--export", out]) if export_command
                     else f"mptkernels.train.export_hf(cfg, {out!r})"))
    else:
        rows.append(("checkpoint", "none (checkpoint.every is 0)"))
    return _block(f"done: step {state['step']:,} of {t['steps']:,}", rows)


def _python() -> str:
    """``python`` when that is this interpreter on the PATH, else this interpreter's path."""
    found = shutil.which("python")
    same = found is not None and os.path.abspath(found) == os.path.abspath(sys.executable)
    return "python" if same else sys.executable


def _log_sinks(cfg, run_dir):
    """TensorBoard and W&B, when the config asks for them (each needs its package)."""
    sinks = []
    if cfg["log"]["tensorboard"]:
        from torch.utils.tensorboard import SummaryWriter  # the package: checked with the config
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        sinks.append(lambda rec: [writer.add_scalar(k, v, rec["step"]) for k, v in rec.items()
                                  if isinstance(v, (int, float)) and k != "step"] and writer.flush())
    if cfg["log"]["wandb_project"]:
        import wandb  # checked with the config
        run = wandb.init(project=cfg["log"]["wandb_project"], config=cfg, dir=run_dir, resume="allow")
        sinks.append(lambda rec: run.log({k: v for k, v in rec.items() if v is not None}, step=rec["step"]))
    return sinks


def _step_grads(model, tokens, doc_ids, micro_batch, world, inject_oom=False):
    """Accumulate the gradient of (sum of token losses / global token count) over this
    process's rows in micro-batches; returns (global loss sum, global token count)."""
    targets = tokens[:, 1:]
    valid = torch.ones_like(targets, dtype=torch.bool) if doc_ids is None else doc_ids[:, 1:] == doc_ids[:, :-1]
    counts = torch.tensor([float(valid.sum())], device=tokens.device)
    dist.all_reduce(counts)
    n_tok = counts.item()
    total = torch.zeros((), device=tokens.device)
    rows = tokens.shape[0]
    for start in range(0, rows, micro_batch):
        if inject_oom and micro_batch > 1:
            raise _InjectedOOM("injected by test_hooks.oom_at_step")
        sl = slice(start, start + micro_batch)
        _, loss_sum = model(tokens[sl], labels=tokens[sl], doc_ids=None if doc_ids is None else doc_ids[sl],
                            loss_reduction="sum")
        # FSDP averages gradients over the processes: scale so the result is the global mean
        (loss_sum * (world / n_tok)).backward()
        total += loss_sum.detach()
    dist.all_reduce(total)
    return total, n_tok


def export_hf(cfg, out_dir):
    """The latest checkpoint's model as a Hugging Face MPT directory."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions

    device, rank, world = _init_distributed(cfg["train"]["device"])
    try:
        model = build_model(cfg, device)
        opt, sched = build_optimizer(model, cfg, device)
        path, _ = resume(cfg["checkpoint"]["dir"], model, opt, sched)
        if path is None:
            raise ConfigError(f"--export: no complete checkpoint in {cfg['checkpoint']['dir']} (checkpoint.dir)")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dist.barrier()
        if rank == 0:
            plain = MPTForCausalLM(model.config)  # the trained model's config (from_hf's included)
            plain.load_state_dict(full)
            try:
                plain.save_pretrained(out_dir)
            except ValueError as e:  # a model transformers' MPT cannot express
                raise ConfigError(f"--export: {e}") from e
            print(f"exported {path} to {out_dir}")
    finally:
        dist.destroy_process_group()


def main(argv=None, prog="python -m mptkernels.train"):
    """The command line; prog is the name its usage shows (``mptkernels train`` when run by that command)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help=f"a YAML config file, or a preset: {', '.join(presets())}")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--export", metavar="DIR", help="write the latest checkpoint as an HF MPT directory and exit")
    args = p.parse_intermixed_args(argv)  # --export before or after the overrides
    try:
        cfg = load_config(args.config, args.overrides)
        if args.export:
            export_hf(cfg, args.export)
        else:
            words = prog.split()
            if words[:2] == ["python", "-m"]:
                words[0] = _python()
            train(cfg, export_command=[*words, args.config, *args.overrides])
    except ConfigError as e:
        if int(os.environ.get("RANK", 0)) == 0:  # every process finds the same error: say it once
            print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
