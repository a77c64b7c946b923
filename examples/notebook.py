# %% [markdown]
# # Reading an activation store from a notebook
# Every cell runs in Jupyter (VS Code / Jupytext read `# %%` cells) or as a plain script:
# `python examples/notebook.py [STORE]`. Without a store argument it captures a small one
# from the built-in `tiny-relu` model first.

# %%
import sys
import tempfile
from pathlib import Path

from workbench import Store
from workbench.capture.runner import CaptureSettings, run_capture

if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
    path = Path(sys.argv[1])
else:
    path = Path(tempfile.mkdtemp()) / "store"
    run_capture(
        CaptureSettings(model="tiny-relu", data="builtin", hooks=["blocks.1.hook_resid_post"], tokens=2048, ctx=64, batch_size=8, store=str(path))
    )
store = Store.open(path)
print(store.info()["views"])

# %% What the store holds: plain SQL over DuckDB views
print(store.sql("SELECT count(*) AS tokens, count(DISTINCT doc) AS documents FROM tokens"))
print(store.sql("SELECT token, count(*) AS n FROM tokens GROUP BY token ORDER BY n DESC LIMIT 10"))

# %% Activations as torch tensors, streamed in chunks (never the whole table in memory)
hook = next(iter(store.info()["hooks"]))
total, sq = 0, 0.0
for chunk in store.iter_activations(hook, chunk_tokens=512):
    total += len(chunk)
    sq += chunk.pow(2).sum(-1).sum().item()
print(f"{hook}: {total} vectors, mean squared norm {sq / total:.3f}")

# %% Join activations to tokens in SQL: the tokens whose residual has the largest first coordinate
view = f"act_{hook.replace('.', '_')}"
print(store.sql(f"SELECT t.token_index, t.token, a.act[1] AS x0 FROM {view} a JOIN tokens t USING (token_index) ORDER BY x0 DESC LIMIT 5"))
