"""clipsearch against rclip, side by side in one run, on the same folders and the same network and weights.

rclip (ONNX Runtime on CPU) runs in its own venv (it needs Python 3.12):

    python3.12 -m venv /tmp/rclip-venv && /tmp/rclip-venv/bin/pip install rclip==4.0.8
    python bench/vs_rclip.py --rclip-python /tmp/rclip-venv/bin/python --workdir /tmp/vs-rclip

rclip downloads its models from a hub, which this benchmark never reaches. Instead it exports open_clip's
ViT-B-32-256 with random weights (`torch.manual_seed(0)`, `pretrained=None`: exactly what clipsearch builds for
the spec `ViT-B-32-256:none`) to the files rclip expects in its data dir (`RCLIP_DATADIR`):
`ViT-B-32-256-datacomp_s34b_b86k/{visual,textual}.onnx` (input `input`, output `output`, dynamic batch), open_clip's
BPE vocabulary under `tokenizer/`, and the licence files it checks for (written as placeholders naming their
origin). Both tools then embed with the same network; the script checks that their text vectors agree.

Measured per folder (one of camera-size 4000x3000 JPEGs, one of small photos), in rounds whose order of the two
tools alternates (clipsearch first in odd rounds), medians: cold index of a new folder (fresh catalog/database,
includes the first query for rclip, whose CLI indexes before it answers; clipsearch's first query is timed on its
own), re-run on the unchanged folder, a text query with no indexing (rclip `--no-indexing`; clipsearch `search`
with no server; `--queries` of each per round, alternating; `--new-queries` more per round, each naming an object
not asked about before), and each process's peak RSS. clipsearch keeps a query's contrast texts on disk (one store
per model on the machine): the store is emptied before each round, so a round's first query and its new-object
queries are new to the machine and only the repeats of QUERY are answered from it. clipsearch's modules are
byte-compiled first, as a wheel install is. The 1-minute load average is recorded before each round.

`--many N` adds a large folder of small photos (N JPEGs of `--many-size`, generated once into the workdir and
kept): both tools index it once (untimed setup, its time is printed and kept in WORKDIR/many-setup.json; rclip's
CLI runs a query after indexing), then each round times the unchanged re-run: `clipsearch index FOLDER` (no model
is loaded when nothing changed) against rclip with indexing (its CLI walks the folder, looks every file up in its
database, then loads the text model and answers the query: the pass cannot be run without a query) and rclip
`--no-indexing` (the query alone), so rclip's own index check is the difference. `--many-model demo` indexes the
large folder with the bundled demo model instead (faster setup; the re-run loads no model either way).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RCLIP_SUBDIR = "ViT-B-32-256-datacomp_s34b_b86k"
LEGAL = ("LICENSE", "OPENAI-CLIP-MIT.txt", "README.md", "THIRD_PARTY_NOTICES.md")
SPEC = "ViT-B-32-256:none"
QUERY = "a photo of a dog on a beach"
# --new-queries: each names an object of the reference vocabulary that the home has not been asked about yet
NEW_OBJECTS = ["cat", "horse", "bicycle", "pizza", "umbrella", "giraffe", "laptop", "boat", "clock", "zebra",
               "elephant", "toaster", "banana", "sheep", "airplane", "train", "couch", "kite", "bench", "teddy bear"]


def export_rclip_models(datadir: Path) -> None:
    """Write rclip's model files from open_clip ViT-B-32-256 with seed-0 random weights (once)."""
    out = datadir / RCLIP_SUBDIR
    if (out / "visual.onnx").is_file() and (out / "textual.onnx").is_file():
        return
    import open_clip
    import torch

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-256", pretrained=None, pretrained_text=False).eval()

    model.requires_grad_(False)
    torch.backends.mha.set_fastpath_enabled(False)  # the fused attention kernel has no ONNX export

    class Visual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_image(x)

    class Textual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.clip = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.clip.encode_text(t)

    batch = {"input": {0: "batch"}, "output": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(Visual(), (torch.randn(2, 3, 256, 256),), str(out / "visual.onnx"), input_names=["input"],
                          output_names=["output"], dynamic_axes=batch, opset_version=17, dynamo=False)
        tokens = open_clip.get_tokenizer("ViT-B-32-256")(["a photo", "two words"])
        torch.onnx.export(Textual(), (tokens,), str(out / "textual.onnx"), input_names=["input"],
                          output_names=["output"], dynamic_axes=batch, opset_version=17, dynamo=False)
    vocab = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    (datadir / "tokenizer").mkdir(exist_ok=True)
    shutil.copy(vocab, datadir / "tokenizer" / vocab.name)
    for name in LEGAL:
        (datadir / name).write_text("placeholder written by clipsearch bench/vs_rclip.py: the model files here are an "
                                    "open_clip ViT-B-32-256 export with random weights (MIT, open_clip)\n")


def make_folder(folder: Path, count: int, size: tuple[int, int]) -> None:
    """Generated photo-like JPEGs (see index_throughput.make_jpegs)."""
    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return
    sys.path.insert(0, str(Path(__file__).parent))
    from index_throughput import make_jpegs

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    make_jpegs(folder, count, size)


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS in MB (GNU time's %M: the largest resident set of the process and its waited-for
    children), and stdout of one command."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "RSSKB=%M", *cmd], env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    kb = [line for line in proc.stderr.splitlines() if line.startswith("RSSKB=")][-1]
    return seconds, int(kb.split("=")[1]) / 1024, proc.stdout


class Tools:
    """The two command lines, each with its own fresh state per round."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.models = work / "rclip-models"

    def rclip_env(self, state: Path) -> dict[str, str]:
        state.mkdir(parents=True, exist_ok=True)
        for item in [RCLIP_SUBDIR, "tokenizer", *LEGAL]:
            link = state / item
            if not link.exists():
                link.symlink_to(self.models / item)
        return {**os.environ, "RCLIP_DATADIR": str(state), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}

    def rclip(self, folder: Path, state: Path, index: bool, query: str = QUERY) -> tuple[float, float]:
        cmd = [self.args.rclip_python, "-m", "rclip", "-f", "-t", "5", query] + ([] if index else ["--no-indexing"])
        s, rss, _ = timed(cmd, self.rclip_env(state), cwd=folder)
        return s, rss

    def clipsearch(self, *argv: str, home: Path) -> tuple[float, float, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")} | {"HF_HUB_OFFLINE": "1"}
        if self.args.backend:
            env["CLIPSEARCH_BACKEND"] = self.args.backend
        return timed([sys.executable, "-m", "clipsearch", *argv, "--home", str(home)], env)


def load() -> float:
    """The 1-minute load average (what `uptime` shows first)."""
    return round(os.getloadavg()[0], 2)


def summarise(rows: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, Any]]:
    return {k: {"seconds": statistics.median(v[0] for v in vs), "peak_rss_mb": max(v[1] for v in vs),
                "rounds_s": [round(v[0], 3) for v in vs]} for k, vs in rows.items()}


def cold_round(tools: Tools, folder: Path, state: Path, home: Path, first_tool: str, queries: int,
               new: list[str], add: Callable[[str, tuple[float, float]], None]) -> None:
    """One round on a new folder: cold index, unchanged re-run, `queries` cold queries of QUERY and one of each
    query of `new`; each step by both tools, `first_tool` first."""

    def rclip_cold() -> None:
        add("rclip cold index + first query", tools.rclip(folder, state, index=True))

    def cs_cold() -> None:
        s, rss, _ = tools.clipsearch("index", str(folder), "--model", tools.args.cs_model, "--no-progress",
                                     home=home)
        q, qrss, _ = tools.clipsearch("search", QUERY, "-k", "5", home=home)
        add("clipsearch cold index + first query", (s + q, max(rss, qrss)))
        add("clipsearch cold index", (s, rss))
        add("clipsearch first query of a new home", (q, qrss))

    def rclip_again() -> None:
        add("rclip re-run, unchanged folder (index check + query)", tools.rclip(folder, state, index=True))

    def cs_again() -> None:
        add("clipsearch re-index, unchanged folder", tools.clipsearch("index", str(folder), "--no-progress",
                                                                      home=home)[:2])

    def rclip_query() -> None:
        add("rclip query, no indexing", tools.rclip(folder, state, index=False))

    def cs_query() -> None:
        add("clipsearch query (no server)", tools.clipsearch("search", QUERY, "-k", "5", home=home)[:2])

    def new_pair(q: str) -> tuple[Callable[[], None], Callable[[], None]]:
        return (lambda: add("rclip query naming a new object, no indexing", tools.rclip(folder, state, False, q)),
                lambda: add("clipsearch query naming a new object (no server)",
                            tools.clipsearch("search", q, "-k", "5", home=home)[:2]))

    steps = [(rclip_cold, cs_cold), (rclip_again, cs_again)] + [(rclip_query, cs_query)] * queries
    for one, other in steps + [new_pair(q) for q in new]:
        if first_tool == "clipsearch":
            one, other = other, one
        one()
        other()


def byte_compile() -> str:
    """Compile clipsearch's modules as a wheel install would have (rclip's, installed by pip, are): with
    PYTHONDONTWRITEBYTECODE set, as on this box, an editable checkout is otherwise recompiled by every process
    (~0.07 s of a cold query)."""
    import compileall

    import clipsearch.indexer
    import clipsearch.search
    import clipsearch.ui

    for pkg in (clipsearch, clipsearch.indexer, clipsearch.search, clipsearch.ui):
        compileall.compile_dir(str(Path(pkg.__file__).parent), quiet=1)
    return "byte-compiled"


def fresh_text_store() -> None:
    """Forget the contrast texts stored on disk (search/text_cache.py) by earlier rounds and runs, so that each
    round's first query and its new-object queries are new to the machine, and only the repeats of QUERY hit it."""
    from clipsearch.indexer.model.onnx_cache import labels_root

    for path in labels_root(None).glob("texts-*.sqlite3*"):
        path.unlink(missing_ok=True)


def run_folder(tools: Tools, name: str, folder: Path, rounds: int, queries: int,
               new_queries: int) -> dict[str, dict[str, Any]]:
    n = len(list(folder.glob("*.jpg")))
    rows: dict[str, list[tuple[float, float]]] = {}
    loads = []
    for r in range(rounds):
        state, home = tools.work / f"rclip-state-{name}-{r}", tools.work / f"cs-home-{name}-{r}"
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        fresh_text_store()
        loads.append(load())
        first = "clipsearch" if r % 2 else "rclip"
        new = [f"a photo of a {o}" for o in NEW_OBJECTS[r * new_queries: (r + 1) * new_queries]]
        cold_round(tools, folder, state, home, first, queries, new, lambda k, v: rows.setdefault(k, []).append(v))
        print(f"{name} round {r + 1}/{rounds} (load {loads[-1]}, {first} first): "
              + ", ".join(f"{k} {v[-1][0]:.2f}" for k, v in rows.items()), flush=True)
    out = summarise(rows)
    for k in ("rclip cold index + first query", "clipsearch cold index"):
        out[k]["photos_per_s"] = n / out[k]["seconds"]
    # rclip's CLI cannot index without answering a query: its indexing alone, less the median no-indexing query
    less = out["rclip cold index + first query"]["seconds"] - out["rclip query, no indexing"]["seconds"]
    out["rclip cold index less its query"] = {"seconds": less, "photos_per_s": n / less,
                                              "peak_rss_mb": out["rclip cold index + first query"]["peak_rss_mb"]}
    out["load averages"] = {"before each round": loads}
    return out


def run_many(tools: Tools, folder: Path, rounds: int, model: str) -> dict[str, dict[str, Any]]:
    """The unchanged re-run on a large folder of small photos, both tools having indexed it once (untimed)."""
    n = len(list(folder.glob("*.jpg")))
    state, home = tools.work / "rclip-state-many", tools.work / f"cs-home-many-{model.replace(':', '_')}"
    marker = tools.work / "many-setup.json"
    setup = json.loads(marker.read_text()) if marker.is_file() else {}
    key = f"{n}:{model}"
    if setup.get("key") != key:
        setup = {"key": key}
        for path in (state, home):
            shutil.rmtree(path, ignore_errors=True)
        print(f"setup: indexing {n} photos once with clipsearch ({model}), then rclip (untimed)", flush=True)
        setup["load before"] = load()
        s, rss, _ = tools.clipsearch("index", str(folder), "--model", model, "--no-progress", home=home)
        setup["clipsearch index"] = {"seconds": s, "peak_rss_mb": rss, "photos_per_s": n / s, "load after": load()}
        print(f"setup: clipsearch {s:.1f} s ({n / s:.1f} photos/s)", flush=True)
        s, rss = tools.rclip(folder, state, index=True)
        setup["rclip index + first query"] = {"seconds": s, "peak_rss_mb": rss, "photos_per_s": n / s,
                                              "load after": load()}
        print(f"setup: rclip {s:.1f} s ({n / s:.1f} photos/s)", flush=True)
        marker.write_text(json.dumps(setup, indent=1))
    rows: dict[str, list[tuple[float, float]]] = {}
    loads = []
    for r in range(rounds):
        loads.append(load())
        steps = [("clipsearch re-index, unchanged folder",
                  lambda: tools.clipsearch("index", str(folder), "--no-progress", home=home)[:2]),
                 ("rclip re-run, unchanged folder (index check + query)",
                  lambda: tools.rclip(folder, state, index=True)),
                 ("rclip query, no indexing", lambda: tools.rclip(folder, state, index=False))]
        for key, step in (steps if r % 2 else steps[::-1]):
            rows.setdefault(key, []).append(step())
        print(f"many round {r + 1}/{rounds} (load {loads[-1]}): "
              + ", ".join(f"{k} {v[-1][0]:.2f}" for k, v in rows.items()), flush=True)
    out = summarise(rows)
    out["rclip index check alone (re-run less query)"] = {
        "seconds": statistics.median(a[0] - b[0] for a, b in zip(
            rows["rclip re-run, unchanged folder (index check + query)"], rows["rclip query, no indexing"],
            strict=True)), "peak_rss_mb": out["rclip re-run, unchanged folder (index check + query)"]["peak_rss_mb"]}
    out["setup (untimed)"] = setup
    out["load averages"] = {"before each round": loads}
    return out


def check_same_network(tools: Tools) -> float:
    """Cosine between rclip's and clipsearch's text vector of one query (same network: ~1.0)."""
    code = ("import json,sys,numpy as np; from rclip.model import Model; m=Model(); "
            f"print(json.dumps(m.compute_text_features([{QUERY!r}])[0].tolist()))")
    env = tools.rclip_env(tools.work / "rclip-probe")
    theirs = json.loads(subprocess.run([tools.args.rclip_python, "-c", code], env=env, capture_output=True,
                                       text=True, check=True).stdout)
    from clipsearch.indexer.model.factory import create_encoder

    ours = create_encoder(SPEC, "cpu", tools.args.backend or "auto").encode_texts([QUERY])[0]
    import numpy as np

    a = np.asarray(theirs, np.float32)
    return float(a @ ours / np.linalg.norm(a))


def versions(args: argparse.Namespace) -> dict[str, str]:
    from importlib.metadata import version

    code = ("import sys, importlib.metadata as m; "
            "print(sys.version.split()[0], m.version('rclip'), m.version('onnxruntime'), m.version('pillow'))")
    theirs = subprocess.run([args.rclip_python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return {"python": sys.version.split()[0], "onnxruntime": version("onnxruntime"), "pillow": version("pillow"),
            "simplejpeg": version("simplejpeg"), "rclip python": theirs[0], "rclip": theirs[1],
            "rclip onnxruntime": theirs[2], "rclip pillow": theirs[3], "cpus": str(os.cpu_count())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rclip-python", required=True, help="python of a venv with rclip installed")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/vs-rclip"))
    ap.add_argument("--big", type=int, default=200, help="camera-size (4000x3000) JPEGs")
    ap.add_argument("--small", type=int, default=200, help="small (640x480) JPEGs")
    ap.add_argument("--many", type=int, default=0, help="a large folder of this many small JPEGs: unchanged re-run")
    ap.add_argument("--many-size", default="128x96", help="WxH of the --many photos")
    ap.add_argument("--many-model", default=SPEC, help="clipsearch's model for the --many setup (e.g. demo)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=1, help="cold queries of each tool per round (alternating)")
    ap.add_argument("--new-queries", type=int, default=0,
                    help="cold queries per round that each name an object the home was not asked about yet")
    ap.add_argument("--cs-model", default=SPEC, help="clipsearch's model for the folders (e.g. the int8 space "
                                                      f"{SPEC}@int8); the network check always uses {SPEC}")
    ap.add_argument("--backend", default=None, help="clipsearch encoder backend (default: its own auto)")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tools = Tools(args, work)
    export_rclip_models(tools.models)
    info = versions(args) | {"clipsearch modules": byte_compile()}
    print(f"versions: {info}")
    print(f"same network check: cosine(rclip, clipsearch) text vector = {check_same_network(tools):.6f}")
    w, h = (int(x) for x in args.many_size.split("x"))
    folders = {"camera 12MP": (work / "big", args.big, (4000, 3000)), "small": (work / "small", args.small, (640, 480)),
               "many": (work / f"many-{args.many}-{args.many_size}", args.many, (w, h))}
    results: dict[str, Any] = {"versions": info}
    for name, (folder, count, size) in folders.items():
        if count:
            make_folder(folder, count, size)
            if name == "many":
                res = run_many(tools, folder, args.rounds, args.many_model)
            else:
                res = run_folder(tools, name.split()[0], folder, args.rounds, args.queries, args.new_queries)
            results[name] = res
            for k, v in res.items():
                if "seconds" not in v:
                    continue
                extra = f"  {v['photos_per_s']:.1f} photos/s" if "photos_per_s" in v else ""
                print(f"{name:12s} {k:55s} {v['seconds']:7.2f} s  peak RSS {v['peak_rss_mb']:6.0f} MB{extra}")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
