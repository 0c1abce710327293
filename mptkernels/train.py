"""Train the MPT model with PyTorch FSDP2, one process or many (torchrun), and survive what goes
wrong: crashes (exact resume from the latest complete checkpoint), out-of-memory (halve the
micro-batch, keep the maths), loss spikes and non-finite values (skip, then roll back).

    python -m mptkernels.train CONFIG.yaml [key.sub=value ...] [--export DIR]
    torchrun --nproc_per_node N -m mptkernels.train CONFIG.yaml [...]

The config (YAML; see configs/) has the sections below; every key has a default in DEFAULTS and
an unknown key is an error naming it. ``--export DIR`` writes the latest checkpoint's model as
a Hugging Face MPT directory (for ``from_hf`` / transformers) instead of training.

* Sharding: every block and the root are ``fully_shard``-ed (FSDP2) over all processes, with
  a mixed-precision policy (``train.precision: bf16`` computes in bf16, keeps fp32 master
  weights and reduces gradients in fp32). CPU runs use gloo.
* A step: the global batch (``train.global_batch`` sequences) is a pure function of
  (data.seed, data step), split evenly over the processes and into micro-batches of
  ``train.micro_batch``; the loss is the sum of token losses over the global batch divided by
  its token count, so the maths do not depend on the number of processes or micro-batches.
* Checkpoints (``torch.distributed.checkpoint``, sharded): model, optimiser, schedule, data
  position, micro-batch and RNG state in ``RUN_DIR/ckpt-STEP``, written to ``ckpt-STEP.tmp``
  and renamed, then marked complete; a directory without the mark is never taken as the
  latest. A checkpoint loads on any number of processes.
* Loss spikes: a step whose loss or gradient norm is not finite, or whose loss exceeds
  ``spike.factor`` times the mean of the last ``spike.window`` steps, is skipped (no optimiser
  update), counted and logged; after ``spike.max_consecutive`` in a row the run reloads the
  last checkpoint and goes on with the data after the batch that caused it.
* Logging: one line per step on the console (loss, tokens/s, MFU, memory) and the same in
  ``RUN_DIR/log.jsonl``.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist

# our blocks return views of fused-op outputs and never modify them in place, which is what
# this FSDP2 warning is about
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

DEFAULTS = {
    "model": {  # an MPTConfig (see mptkernels.models.mpt), or from_hf: DIR
        "from_hf": None, "d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 4, "max_seq_len": 128,
        "vocab_size": 256, "learned_pos_emb": False, "no_bias": True, "attn_config": {"alibi": True},
        "norm_cast": "torch",
    },
    "data": {"path": None, "seq_len": 64, "seed": 0, "doc_attention": True},
    "train": {
        "steps": 100, "global_batch": 8, "micro_batch": 4, "lr": 3e-3, "min_lr_ratio": 0.1, "warmup_steps": 10,
        "weight_decay": 0.0, "betas": [0.9, 0.95], "grad_clip": 1.0, "seed": 0, "precision": "fp32",
        "activation_checkpointing": False, "compile": False, "peak_tflops": None,
        "device": "auto",  # auto: CUDA (one GPU per process) when available, else the CPU (gloo)
    },
    "checkpoint": {"dir": "runs/default", "every": 50, "keep": 2},
    "spike": {"factor": 3.0, "window": 20, "max_consecutive": 3},
    "log": {"every": 1, "tensorboard": False, "wandb_project": None},
    "test_hooks": {"oom_at_step": None, "nan_at_step": None, "crash_at_step": None},
}


# ------------------------------------------------------------------ config
def _merge(base: dict, over: dict, path=""):
    out = copy.deepcopy(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if k not in base:
            raise KeyError(f"config: unknown key '{where}' (known: {', '.join(sorted(base))})")
        if isinstance(base[k], dict) and k != "attn_config":
            if not isinstance(v, dict):
                raise TypeError(f"config: '{where}' must be a mapping, got {type(v).__name__}")
            out[k] = _merge(base[k], v, where + ".")
        else:
            out[k] = v
    return out


def load_config(path=None, overrides=()) -> dict:
    """DEFAULTS <- the YAML file <- key.sub=value overrides (values parsed as YAML)."""
    import yaml

    cfg = copy.deepcopy(DEFAULTS)
    if path:
        with open(path) as fh:
            cfg = _merge(cfg, yaml.safe_load(fh) or {})
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"config override '{item}' must look like key.sub=value")
        key, value = item.split("=", 1)
        node: dict = {}
        leaf = node
        parts = key.split(".")
        for p in parts[:-1]:
            leaf[p] = {}
            leaf = leaf[p]
        leaf[parts[-1]] = yaml.safe_load(value)
        cfg = _merge(cfg, node)
    t = cfg["train"]
    if t["precision"] not in ("fp32", "bf16"):
        raise ValueError(f"config: train.precision must be fp32 or bf16, got {t['precision']!r}")
    if cfg["data"]["path"] is None:
        raise ValueError("config: data.path is required (a directory from `python -m mptkernels.data prepare`)")
    return cfg


# ------------------------------------------------------------------ distributed setup
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(want="auto"):
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"config: train.device must be auto, cpu or cuda, got {want!r}")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend)
    else:  # one process without torchrun: a group of one, so every code path is the same
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
    return device, dist.get_rank(), dist.get_world_size()


def _print(*a, **k):
    if dist.get_rank() == 0:
        print(*a, **k, flush=True)


# ------------------------------------------------------------------ model, optimiser, schedule
def build_model(cfg, device):
    from .models import MPTConfig, MPTForCausalLM

    m = dict(cfg["model"])
    src = m.pop("from_hf")
    if src:
        model = MPTForCausalLM.from_hf(src)
    else:
        torch.manual_seed(cfg["train"]["seed"])
        model = MPTForCausalLM(MPTConfig(**m))
    model.to(device)
    if cfg["train"]["activation_checkpointing"]:
        from torch.utils.checkpoint import checkpoint

        for block in model.transformer.blocks:
            block._orig_forward = block.forward
            block.forward = lambda *a, _b=block, **k: checkpoint(_b._orig_forward, *a, use_reentrant=False, **k)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg["train"]["precision"] == "bf16" else MixedPrecisionPolicy())
    for block in model.transformer.blocks:
        if cfg["train"]["compile"]:
            block.compile()
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
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


def save_checkpoint(run_dir, step, model, opt, sched, state, keep):
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
    dcp.save({"model": msd, "optim": osd, **extra}, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(final, "complete.json"), "w") as fh:
            json.dump({"step": step}, fh)
        for old in _ckpts(run_dir)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(path, model, opt, sched):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    md = dcp.FileSystemReader(path).read_metadata()
    state = {"model": msd, "optim": osd, "meta": torch.zeros(md.state_dict_metadata["meta"].size, dtype=torch.uint8),
             "rng": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    meta = json.loads(bytes(state["meta"].tolist()).decode())
    sched.load_state_dict(meta.pop("sched"))
    torch.set_rng_state(state["rng"])
    return meta


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


def train(cfg) -> list:
    """Runs (or resumes) training as configured; returns the logged records of this process."""
    from .data import TokenDataset

    device, rank, world = _init_distributed(cfg["train"]["device"])
    try:
        records = _train(cfg, device, rank, world, TokenDataset(cfg["data"]["path"]))
        # every process done before the group goes away: a gloo process group torn down while
        # a peer is still in its last collective aborts that peer
        dist.barrier()
        return records
    finally:
        dist.destroy_process_group()


def _train(cfg, device, rank, world, data):
    t, ck, sp, hooks = cfg["train"], cfg["checkpoint"], cfg["spike"], cfg["test_hooks"]
    seq = cfg["data"]["seq_len"]
    if t["global_batch"] % world:
        raise ValueError(f"train.global_batch ({t['global_batch']}) must be a multiple of the {world} processes")
    per_rank = t["global_batch"] // world
    model = build_model(cfg, device)
    opt, sched = build_optimizer(model, cfg, device)
    n_params = sum(p.numel() for p in model.parameters())
    state = {"step": 0, "data_step": 0, "micro_batch": min(t["micro_batch"], per_rank), "skipped": 0,
             "recent": [], "consecutive": 0, "oom_done": False}
    run_dir = ck["dir"]
    for path in _ckpts(run_dir):
        try:
            state.update(load_checkpoint(path, model, opt, sched))
            _print(f"resumed from {path} at step {state['step']}")
            break
        except Exception as e:  # a damaged checkpoint: say so and try the one before
            if rank == 0:
                warnings.warn(f"train: cannot load {path} ({type(e).__name__}: {e}); trying an older one")
    log_path = os.path.join(run_dir, "log.jsonl")
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
    sinks = _log_sinks(cfg, run_dir) if rank == 0 else []
    records = []
    while state["step"] < t["steps"]:
        step, dstep = state["step"], state["data_step"]
        if hooks["crash_at_step"] is not None and step == hooks["crash_at_step"]:
            os.kill(os.getpid(), 9)  # a node dying mid-run (tests)
        tokens, doc_ids = data.batch(dstep, t["global_batch"], seq, seed=cfg["data"]["seed"])
        tokens = tokens[rank * per_rank:(rank + 1) * per_rank].to(device)
        doc_ids = doc_ids[rank * per_rank:(rank + 1) * per_rank].to(device) if cfg["data"]["doc_attention"] else None
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
                ckpts = _ckpts(run_dir)
                if ckpts:
                    resume_data, skipped = state["data_step"], state["skipped"]
                    state.update(load_checkpoint(ckpts[0], model, opt, sched))
                    # on past the bad data; the skipped steps still count
                    state["data_step"], state["consecutive"], state["skipped"] = resume_data, 0, skipped
                    _print(f"{sp['max_consecutive']} bad steps in a row: rolled back to {ckpts[0]}, "
                           f"going on from data step {resume_data}")
                    records.append({"step": state["step"], "event": "rollback", "checkpoint": ckpts[0]})
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
        if ck["every"] and state["step"] % ck["every"] == 0:
            save_checkpoint(run_dir, state["step"], model, opt, sched, state, ck["keep"])
    return records


def _log_sinks(cfg, run_dir):
    """TensorBoard and W&B, when the config asks for them (each needs its package)."""
    sinks = []
    if cfg["log"]["tensorboard"]:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("log.tensorboard: true needs the tensorboard package (pip install tensorboard)") from e
        writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        sinks.append(lambda rec: [writer.add_scalar(k, v, rec["step"]) for k, v in rec.items()
                                  if isinstance(v, (int, float)) and k != "step"] and writer.flush())
    if cfg["log"]["wandb_project"]:
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError("log.wandb_project needs the wandb package (pip install wandb)") from e
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
        ckpts = _ckpts(cfg["checkpoint"]["dir"])
        if not ckpts:
            raise FileNotFoundError(f"export: no complete checkpoint in {cfg['checkpoint']['dir']}")
        load_checkpoint(ckpts[0], model, opt, sched)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        dist.barrier()
        if rank == 0:
            from .models import MPTConfig, MPTForCausalLM

            m = {k: v for k, v in cfg["model"].items() if k != "from_hf"}
            plain = MPTForCausalLM(MPTConfig(**m))
            plain.load_state_dict(full)
            plain.save_pretrained(out_dir)
            print(f"exported {ckpts[0]} to {out_dir}")
    finally:
        dist.destroy_process_group()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m mptkernels.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--export", metavar="DIR", help="write the latest checkpoint as an HF MPT directory and exit")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (KeyError, ValueError, TypeError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    if args.export:
        export_hf(cfg, args.export)
        return 0
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
