"""Training the zoo: a byte-level BPE tokenizer and a HookedTransformer on the builtin corpus.

The recipe (ZooSpec in workbench.models.zoo) is AdamW with linear warmup and cosine decay,
windows of n_ctx tokens that all start with <|bos|> (attention sinks form on it), a
Switch-style load-balancing loss on the MoE routers, bf16 autocast on CUDA. Everything is
seeded; `--minutes` only fixes the step count from the speed measured in the first steps.
What the run did (tokens seen, held-out loss against the unigram baseline, and a snapshot
of the phenomena the app shows) is written to training.json beside the weights.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.models.zoo import (
    CONFIG_FILE,
    RECORD_FILE,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    VOCAB_SIZE,
    WEIGHTS_FILE,
    ZooSpec,
    load_zoo_tokenizer,
    weights_fingerprint,
    zoo_dir,
    zoo_spec,
)

SINK_EPS = 0.3
SINK_WINDOW = 64  # T of the Sink_1 metric in phenomena.md


# ---- tokenizer and token streams ------------------------------------------------------------
def train_tokenizer(documents: list[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """Byte-level BPE over the documents; ids 0-2 are <|bos|>, <|endoftext|>, <|pad|>.

    Its post-processor prepends <|bos|> when special tokens are asked for, the way
    TransformerLens's to_tokens expects.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    bos = SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return tokenizer


def encode_documents(tokenizer: Any, documents: list[str]) -> np.ndarray:
    """One uint16 stream of all documents, each followed by <|endoftext|>."""
    eos = tokenizer.token_to_id(SPECIAL_TOKENS[1])
    parts = []
    for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
        parts.append(np.asarray(encoding.ids, dtype=np.uint16))
        parts.append(np.asarray([eos], dtype=np.uint16))
    return np.concatenate(parts)


def heldout_windows(stream: np.ndarray, n_ctx: int, bos_id: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping evaluation windows [n, n_ctx]: <|bos|> then n_ctx - 1 stream tokens."""
    body = n_ctx - 1
    n = len(stream) // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise WorkbenchError(f"held-out stream of {len(stream)} tokens is shorter than one window of {n_ctx}")
    rows = torch.from_numpy(stream[: n * body].astype(np.int64)).view(n, body)
    return torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), rows], dim=1)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Entropy (nats) of the empirical token distribution: the loss of the best unigram model."""
    counts = torch.bincount(tokens.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


# ---- model, loss, evaluation ---------------------------------------------------------------
def build_model(spec: ZooSpec, d_vocab: int, device: str, tokenizer: Any = None) -> Any:
    """A freshly initialised (seeded) HookedTransformer of the spec's shape."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**spec.hooked_config(d_vocab), device=device)
    return HookedTransformer(cfg, tokenizer=tokenizer)


def next_token_nll(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position next-token loss [batch, ctx - 1] in nats (float32)."""
    logits = model(tokens, return_type="logits")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


def _autocast(device: str) -> Any:
    kind = torch.device(device).type
    return torch.autocast("cuda", dtype=torch.bfloat16) if kind == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def heldout_loss(model: Any, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token loss (nats) over evaluation windows."""
    device = str(next(model.parameters()).device)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size].to(device)
        with _autocast(device):
            nll = next_token_nll(model, tokens)
        total += float(nll.sum())
        count += nll.numel()
    return total / count


class RouterBalance:
    """Switch-Transformer load balancing: E * sum_e f_e * P_e over every MoE layer.

    f_e is the share of routing slots expert e received, P_e its mean router probability;
    the loss is 1 at perfect balance. It reads TransformerLens's router hooks, so the model
    stays a stock HookedTransformer.
    """

    def __init__(self, model: Any) -> None:
        self.n_experts = model.cfg.num_experts
        self.probs: list[torch.Tensor] = []
        self.indices: list[torch.Tensor] = []
        for layer in range(model.cfg.n_layers):
            model.add_hook(f"blocks.{layer}.mlp.hook_expert_weights", self._keep(self.probs))
            model.add_hook(f"blocks.{layer}.mlp.hook_expert_indices", self._keep(self.indices))

    @staticmethod
    def _keep(into: list[torch.Tensor]) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            into.append(tensor)

        return hook

    def clear(self) -> None:
        """Forget router outputs of forward passes that are not training steps (evaluation)."""
        self.probs.clear()
        self.indices.clear()

    def pop_loss(self) -> torch.Tensor:
        """The loss of the last forward pass, averaged over layers; clears what it read."""
        losses = []
        for probs, indices in zip(self.probs, self.indices):
            slots = F.one_hot(indices.flatten(), self.n_experts).float().mean(0)
            losses.append(self.n_experts * (slots * probs.float().mean(0)).sum())
        self.clear()
        return torch.stack(losses).mean()


@torch.no_grad()
def phenomena_snapshot(model: Any, windows: torch.Tensor, batch_size: int = 32) -> dict[str, Any]:
    """What the app will show, measured on held-out windows of SINK_WINDOW tokens.

    alpha_1[l][h] = mean attention all queries give to position 1 (the <|bos|>); Sink_1 = %
    of (window, layer, head) with alpha_1 > 0.3 (phenomena.md). ReLU models: % of MLP
    neurons > 0 per token and layer, and dead neurons. MoE models: expert load entropy
    (normalised) per layer and token-id specialisation against a shuffled-id baseline.
    """
    cfg = model.cfg
    device = str(next(model.parameters()).device)
    windows = windows[:, :SINK_WINDOW]
    alpha1, active, fired, routes = [], [], None, []
    for start in range(0, len(windows), batch_size):
        tokens = windows[start : start + batch_size].to(device)
        wanted = lambda name: name.endswith(("hook_pattern", "mlp.hook_post", "hook_expert_indices"))  # noqa: E731
        _, cache = model.run_with_cache(tokens, names_filter=wanted)
        alpha1.append(torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][:, :, :, 0].mean(-1) for l in range(cfg.n_layers)], 1))
        if cfg.num_experts:
            routes.append(torch.stack([cache[f"blocks.{l}.mlp.hook_expert_indices"][:, 0] for l in range(cfg.n_layers)], 1))
        else:
            post = torch.stack([cache[f"blocks.{l}.mlp.hook_post"] for l in range(cfg.n_layers)], 0) > 0
            active.append(post.float().mean(-1).flatten(1))  # [layer, tokens]
            hits = post.flatten(1, 2).any(1)
            fired = hits if fired is None else fired | hits
    a1 = torch.cat(alpha1).float().cpu()  # [window, layer, head]
    snapshot: dict[str, Any] = {
        "windows": len(windows),
        "window_tokens": windows.shape[1],
        "sink_rate_eps_0.3": round(100 * float((a1 > SINK_EPS).float().mean()), 2),
        "sink_rate_per_layer": [round(100 * float(x), 1) for x in (a1 > SINK_EPS).float().mean((0, 2))],
        "alpha_1_mean": [[round(float(x), 3) for x in row] for row in a1.mean(0)],
    }
    if cfg.num_experts:
        snapshot.update(_routing_stats(torch.cat(routes).cpu(), windows.flatten(), cfg.num_experts))
    else:
        per_layer = torch.cat(active, 1).mean(1)
        snapshot["mlp_active_percent_per_layer"] = [round(100 * float(x), 2) for x in per_layer]
        snapshot["dead_neurons_per_layer"] = [int((~row).sum()) for row in fired.cpu()]
    return snapshot


def _routing_stats(top1: torch.Tensor, token_ids: torch.Tensor, n_experts: int, min_count: int = 20) -> dict[str, Any]:
    """Load entropy and token-id specialisation of the top-1 expert, per layer."""
    load_entropy, specialisation, chance = [], [], []
    generator = torch.Generator().manual_seed(0)
    shuffled_ids = token_ids[torch.randperm(len(token_ids), generator=generator)]
    for layer in range(top1.shape[1]):
        experts = top1[:, layer]
        load = torch.bincount(experts, minlength=n_experts).double() / len(experts)
        nz = load[load > 0]
        load_entropy.append(round(float(-(nz * nz.log()).sum() / math.log(n_experts)), 3))
        specialisation.append(round(_top_expert_share(token_ids, experts, n_experts, min_count), 3))
        chance.append(round(_top_expert_share(shuffled_ids, experts, n_experts, min_count), 3))
    return {
        "expert_load_entropy_per_layer": load_entropy,
        "token_specialisation_per_layer": specialisation,
        "token_specialisation_shuffled_per_layer": chance,
    }


def _top_expert_share(token_ids: torch.Tensor, experts: torch.Tensor, n_experts: int, min_count: int) -> float:
    """Share of a token id's occurrences sent to its most common expert, weighted by count."""
    table = torch.zeros(int(token_ids.max()) + 1, n_experts)
    table.index_put_((token_ids, experts), torch.ones(len(experts)), accumulate=True)
    counts = table.sum(1)
    keep = counts >= min_count
    return float(table[keep].max(1).values.sum() / counts[keep].sum())


# ---- the training loop ---------------------------------------------------------------------
def _learning_rate(spec: ZooSpec, step: int, total: int) -> float:
    warmup = min(spec.warmup_steps, max(1, total // 10))
    if step < warmup:
        return spec.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = spec.min_lr_fraction
    return spec.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _optimizer(model: Any, spec: ZooSpec, device: str) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95), fused=torch.device(device).type == "cuda")


def train_model(
    spec: ZooSpec,
    train_stream: np.ndarray,
    heldout: torch.Tensor,
    device: str = "cpu",
    steps: int | None = None,
    minutes: float | None = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Train a fresh model; returns it and the record of the run (curve, tokens, losses).

    steps: how many optimizer steps (default: the spec's). minutes: a time budget that can
    only lower that count; it is fixed after the first steps from their measured speed, so
    the cosine schedule still ends where training ends.
    """
    from tqdm import tqdm

    torch.manual_seed(spec.seed)
    d_vocab = VOCAB_SIZE if tokenizer is None else len(tokenizer)
    model = build_model(spec, d_vocab, device, tokenizer).train()
    optimizer = _optimizer(model, spec, device)
    balance = RouterBalance(model) if spec.num_experts else None
    stream = torch.from_numpy(train_stream.astype(np.int64)).to(device)
    generator = torch.Generator(device=device).manual_seed(spec.seed + 1)
    body = spec.n_ctx - 1
    span = torch.arange(body, device=device)
    bos_id = 0 if tokenizer is None else tokenizer.bos_token_id
    bos = torch.full((spec.batch_size, 1), bos_id, dtype=torch.long, device=device)
    eval_windows = heldout[:64]

    total = steps or spec.steps
    curve: list[dict[str, float]] = []
    started = time.perf_counter()
    timing_from = None
    bar = tqdm(total=total, disable=not progress, mininterval=2.0, unit="step", dynamic_ncols=True)
    step = 0
    while step < total:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(spec, step, total)
        starts = torch.randint(0, len(stream) - body, (spec.batch_size, 1), device=device, generator=generator)
        tokens = torch.cat([bos, stream[starts + span]], dim=1)
        if balance:
            balance.clear()
        with _autocast(device):
            loss = next_token_nll(model, tokens).mean()
            aux = balance.pop_loss() if balance else torch.zeros((), device=device)
        optimizer.zero_grad(set_to_none=True)
        (loss + spec.router_balance_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        bar.update(1)
        if minutes is not None and step == 5:
            _sync(device)
            timing_from = time.perf_counter()
        if minutes is not None and step == 30:
            _sync(device)
            per_step = (time.perf_counter() - timing_from) / 25
            budget = minutes * 60 - (time.perf_counter() - started)
            total = max(step + 1, min(total, step + int(budget / per_step)))
            bar.reset(total=total)
            bar.update(step)
        if step == 1 or step % 200 == 0 or step == total:
            elapsed = time.perf_counter() - started
            point = {"step": step, "tokens": step * spec.batch_size * spec.n_ctx, "train_loss": round(loss.item(), 4),
                     "lr": _learning_rate(spec, step - 1, total), "seconds": round(elapsed, 1)}
            if balance:
                point["router_balance"] = round(aux.item(), 4)
            if step == 1 or step % 1000 == 0 or step == total:
                model.eval()
                point["heldout_loss"] = round(heldout_loss(model, eval_windows), 4)
                model.train()
            curve.append(point)
            bar.set_postfix(loss=f"{point['train_loss']:.3f}", tok_s=f"{point['tokens'] / elapsed:,.0f}")
    bar.close()
    _sync(device)
    seconds = time.perf_counter() - started
    model.reset_hooks()
    model.eval()
    record = {
        "steps": step,
        "tokens_seen": step * spec.batch_size * spec.n_ctx,
        "epochs": round(step * spec.batch_size * body / len(train_stream), 2),
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(step * spec.batch_size * spec.n_ctx / seconds),
        "curve": curve,
    }
    return model, record


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- saving and the whole pipeline ---------------------------------------------------------
def save_zoo_model(model: Any, spec: ZooSpec, tokenizer_path: Path, record: dict[str, Any], out: Path) -> Path:
    """Write fp16 weights, config, tokenizer, training.json and a short README into `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    parameters = {name: p.detach().to("cpu", torch.float16).contiguous() for name, p in model.named_parameters()}
    save_file(parameters, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(spec.hooked_config(model.cfg.d_vocab), indent=1) + "\n")
    if tokenizer_path.resolve() != (out / TOKENIZER_FILE).resolve():
        (out / TOKENIZER_FILE).write_text(tokenizer_path.read_text())
    record = {**record, "weights_sha256_16": weights_fingerprint(out / WEIGHTS_FILE),
              "weights_bytes": (out / WEIGHTS_FILE).stat().st_size,
              "parameters": sum(p.numel() for p in parameters.values())}
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(_readme(spec, record))
    return out


def _readme(spec: ZooSpec, record: dict[str, Any]) -> str:
    snap = record.get("phenomena", {})
    lines = [
        f"# {spec.name}",
        "",
        f"{spec.summary}. {spec.n_layers} layers, d_model {spec.d_model}, {spec.n_heads} heads, "
        f"d_mlp {spec.d_mlp}" + (f", {spec.num_experts} experts (top-{spec.experts_per_token})" if spec.num_experts else "")
        + f", n_ctx {spec.n_ctx}, {record['parameters']:,} parameters stored as fp16.",
        "",
        "Trained by `workbench zoo train "
        + f"{spec.name} --steps {record['steps']}" + (" --device cuda" if record["device"].startswith("NVIDIA") else "")
        + f"` on {record['device']} ({record['train_seconds']} s, {record['tokens_seen']:,} tokens, "
        f"{record['epochs']} epochs of the builtin corpus: the Python {record['corpus']['python']} standard library's "
        "`.py` files, held-out files chosen by a hash of their path).",
        "",
        f"- held-out loss: {record['heldout_loss']:.3f} nats/token; unigram entropy of the held-out tokens: "
        f"{record['heldout_unigram_entropy']:.3f} nats (ratio {record['heldout_loss'] / record['heldout_unigram_entropy']:.2f})",
        f"- Sink_1 (eps 0.3, T={SINK_WINDOW}, held-out windows): {snap.get('sink_rate_eps_0.3')}% "
        f"(per layer {snap.get('sink_rate_per_layer')})",
    ]
    if "mlp_active_percent_per_layer" in snap:
        lines.append(f"- MLP neurons > 0 per token, per layer: {snap['mlp_active_percent_per_layer']} %; "
                     f"dead neurons per layer: {snap['dead_neurons_per_layer']}")
    if "token_specialisation_per_layer" in snap:
        lines.append(f"- top-1 expert token-id specialisation per layer: {snap['token_specialisation_per_layer']} "
                     f"(shuffled ids: {snap['token_specialisation_shuffled_per_layer']}); normalised load entropy: "
                     f"{snap['expert_load_entropy_per_layer']}")
    lines += ["", f"Recipe: {json.dumps(record['recipe'])}", "", "training.json holds the loss curve and the rest.", ""]
    return "\n".join(lines)


def corpus_description(n_train_docs: int, n_heldout_docs: int, train_tokens: int, heldout_tokens: int) -> dict[str, Any]:
    """What the corpus was, for the record."""
    return {
        "python": platform.python_version(),
        "train_documents": n_train_docs,
        "heldout_documents": n_heldout_docs,
        "train_tokens": train_tokens,
        "heldout_tokens": heldout_tokens,
    }


def finish_and_save(
    spec: ZooSpec,
    tokenizer_path: Path,
    train_stream: np.ndarray,
    heldout_stream: np.ndarray,
    corpus: dict[str, Any],
    out: Path,
    device: str = "cpu",
    steps: int | None = None,
    minutes: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on prepared token streams, measure, and save everything into `out`."""
    tokenizer = load_zoo_tokenizer(tokenizer_path)
    windows = heldout_windows(heldout_stream, spec.n_ctx, tokenizer.bos_token_id)
    model, record = train_model(spec, train_stream, windows, device, steps, minutes, tokenizer, progress)
    record.update(
        model=spec.name,
        device=torch.cuda.get_device_name() if torch.device(device).type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        torch=torch.__version__,
        recipe=spec.recipe(),
        corpus=corpus,
        heldout_loss=round(heldout_loss(model, windows), 4),
        heldout_unigram_entropy=round(unigram_entropy(windows[:, 1:]), 4),
        heldout_windows=len(windows),
        phenomena=phenomena_snapshot(model, heldout_windows(heldout_stream, SINK_WINDOW, tokenizer.bos_token_id, 512)),
    )
    save_zoo_model(model, spec, tokenizer_path, record, out)
    return record


def train_zoo(
    name: str,
    device: str = "cpu",
    steps: int | None = None,
    minutes: float | None = None,
    out: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole `workbench zoo train NAME`: corpus -> tokenizer -> token streams -> model -> files."""
    from workbench.models.corpus import builtin_documents

    spec = zoo_spec(name)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if steps is not None and steps <= 0:
        raise WorkbenchError("--steps must be positive")
    if minutes is not None and minutes <= 0:
        raise WorkbenchError("--minutes must be positive")
    out = Path(out) if out is not None else zoo_dir(name)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise WorkbenchError(f"cannot write to {out.parent}: {err.strerror}; pick another --out") from err
    train_docs, heldout_docs = builtin_documents("train"), builtin_documents("heldout")
    tokenizer = train_tokenizer(train_docs)
    tokenizer_path = staging / TOKENIZER_FILE
    tokenizer.save(str(tokenizer_path))
    train_stream = encode_documents(tokenizer, train_docs)
    heldout_stream = encode_documents(tokenizer, heldout_docs)
    corpus = corpus_description(len(train_docs), len(heldout_docs), len(train_stream), len(heldout_stream))
    record = finish_and_save(spec, tokenizer_path, train_stream, heldout_stream, corpus, staging, device, steps, minutes, progress)
    _replace_folder(staging, out)
    return record


def _replace_folder(new: Path, old: Path) -> None:
    """Swap a finished folder in, so an interrupted training never leaves half-written weights."""
    retired = old.with_name(f".{old.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if old.exists():
        old.rename(retired)
    new.rename(old)
    shutil.rmtree(retired, ignore_errors=True)
