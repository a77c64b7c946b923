"""What capture needs from any model: one object over HookedTransformer, TransformerBridge and HookedEncoder.

Every loader (the zoo, MiniLM, local Hugging Face folders, TransformerLens names) returns a
ModelHandle, so the capture runner, the probes and the SAE evaluation never ask which kind
of model they hold.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.errors import WorkbenchError


@dataclass
class ModelHandle:
    """A loaded, hookable model with its tokenizer.

    name: what the user typed (zoo name, package name or path); fingerprint: a short hash of
    the weights, stored with every capture so a store never mixes two models.
    kind: "decoder" (causal LM) or "encoder" (bidirectional, e.g. MiniLM).
    prefix_ids / suffix_ids: special tokens framing every context window ([BOS] for decoders,
    [CLS] ... [SEP] for BERT-like encoders); they are recorded as tokens like any other.
    """

    name: str
    model: Any
    tokenizer: Any
    fingerprint: str
    kind: str = "decoder"
    prefix_ids: list[int] = field(default_factory=list)
    suffix_ids: list[int] = field(default_factory=list)
    n_layers: int = 0
    d_model: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    # ---- hooks -------------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        """Every TransformerLens hook name this model exposes."""
        return sorted(self.model.hook_dict.keys())

    def resolve_hooks(self, patterns: list[str]) -> list[str]:
        """Expand exact names and globs; unknown names raise with the closest valid ones."""
        names = self.hook_names()
        out: list[str] = []
        for pattern in patterns:
            pattern = pattern.strip()
            if not pattern:
                continue
            if any(ch in pattern for ch in "*?["):
                hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            else:
                hits = [pattern] if pattern in names else []
            if not hits:
                close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise WorkbenchError(
                    f"unknown hook '{pattern}' for model {self.name}{hint} "
                    f"(`workbench hooks --model {self.name}` lists all {len(names)})"
                )
            out.extend(h for h in hits if h not in out)
        return out

    def stop_layer_for(self, hooks: list[str]) -> int | None:
        """The first block no requested hook needs, so the forward pass can stop there."""
        deepest = -1
        for hook in hooks:
            parts = hook.split(".")
            if parts[0] != "blocks" or len(parts) < 2 or not parts[1].isdigit():
                return None  # embed, ln_final, unembed...: the whole model is needed
            deepest = max(deepest, int(parts[1]))
        if deepest < 0 or deepest + 1 >= self.n_layers:
            return None
        return deepest + 1

    @property
    def n_ctx(self) -> int | None:
        """The longest window the model takes, special tokens included (None if it does not say)."""
        n_ctx = getattr(getattr(self.model, "cfg", None), "n_ctx", None)
        return int(n_ctx) if n_ctx else None

    # ---- running -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def run(self, tokens: torch.Tensor, hooks: list[str], stop_at_layer: int | None = None) -> dict[str, torch.Tensor]:
        """Forward pass over tokens [batch, ctx]; returns {hook: tensor} for the hooks asked."""
        wanted = set(hooks)
        cache: dict[str, torch.Tensor] = {}

        def saver(name: str) -> Any:
            # Keyed by the name asked for: TransformerBridge calls a hook under its canonical
            # name (blocks.0.hook_out when blocks.0.hook_resid_post was asked for).
            def save(tensor: torch.Tensor, hook: Any) -> None:
                cache[name] = tensor.detach()

            return save

        fwd_hooks = [(name, saver(name)) for name in hooks]
        kwargs: dict[str, Any] = {}
        if stop_at_layer is not None:
            kwargs["stop_at_layer"] = stop_at_layer
        if self.kind == "encoder":
            kwargs.update(self.extra.get("encoder_kwargs", {}))
        self.model.run_with_hooks(tokens.to(self.device), fwd_hooks=fwd_hooks, return_type=None, **kwargs)
        missing = wanted - cache.keys()
        if missing:
            raise WorkbenchError(f"hooks did not fire for model {self.name}: {', '.join(sorted(missing))}")
        return cache

    def hook_shapes(self, hooks: list[str]) -> dict[str, tuple[int, ...]]:
        """Per-token shape of each hook's output; hooks that are not per token are refused."""
        n = len(self.prefix_ids) + len(self.suffix_ids) + 5
        probe_tokens = torch.full((1, n), self.extra.get("probe_token_id", 0), dtype=torch.long)
        probe_tokens[0, : len(self.prefix_ids)] = torch.tensor(self.prefix_ids, dtype=torch.long)
        cache = self.run(probe_tokens, hooks)
        shapes = {}
        for hook in hooks:
            shape = tuple(cache[hook].shape)
            per_token = len(shape) >= 2 and shape[:2] == (1, n) and not (len(shape) == 4 and shape[2] == shape[3] == n)
            if not per_token:
                raise WorkbenchError(
                    f"hook '{hook}' is not one vector per token (shape {list(shape)} for {n} tokens) and cannot be "
                    "stored densely; attention patterns and router outputs are captured with --probes sinks,routing"
                )
            shapes[hook] = shape[2:]
        return shapes

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (capture frames windows itself)."""
        return self.tokenize_many([text])[0]

    def tokenize_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of several texts at once (the Rust tokenizer works them in parallel)."""
        return [list(ids) for ids in self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def window_ids(self, text: str, limit: int | None = None) -> list[int]:
        """One window of a text for a forward pass: the special tokens framing the text's tokens,
        cut so the whole window fits the model's context (and limit, if given)."""
        longest = min(n for n in (self.n_ctx, limit) if n is not None) if (self.n_ctx or limit) else None
        body = self.tokenize(text)
        if longest is not None:
            body = body[: max(longest - len(self.prefix_ids) - len(self.suffix_ids), 0)]
        return self.prefix_ids + body + self.suffix_ids

    def token_strings(self, ids: list[int]) -> list[str]:
        """Readable string of each token id (decoded one by one, so spaces show)."""
        return [self.tokenizer.decode([i]) for i in ids]
