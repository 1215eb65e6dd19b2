"""Library page: counts, failures with reasons, embedding spaces; index a folder with live progress.

Indexing runs as a separate `clipsearch index` process (outside the UI's cached objects); this page polls the
progress file it writes. The search service notices the new index generation on its next query. Only folders
under the roots the UI was started with (`clipsearch ui --roots DIR`) can be indexed from here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import streamlit as st

from clipsearch.ui.state import config, folder_under_roots, show_error

st.title("Library")
try:
    from clipsearch.ui.commands import status_data

    cfg = config()
    data = status_data(cfg)
    cols = st.columns(4)
    for col, key in zip(cols, ("indexed", "failed", "unsupported", "empty"), strict=True):
        col.metric(key.capitalize(), data[key])
    st.subheader("Embedding spaces")
    st.table([{"model": s["model"], "dim": s["dim"], "vectors": s["vectors"], "index": s["index_type"] or "—"}
              for s in data["spaces"]] or [{"model": "none yet"}])
    if data["failures"]:
        st.subheader("Files that could not be indexed")
        st.dataframe([{"path": f["path"], "status": f["status"], "reason": f["reason"]} for f in data["failures"]])

    st.subheader("Index a folder")
    progress_file = cfg.home / "index-progress.json"
    if not cfg.roots:
        st.info("Indexing from the UI is off. Start the UI with `clipsearch ui --roots DIR` to allow the folders "
                "under DIR, or index with `clipsearch index DIR`.")
    else:
        st.caption("Folders under: " + ", ".join(f"`{r}`" for r in cfg.roots))
        folder = st.text_input("Folder on this machine", str(cfg.roots[0]), key="lib_folder")
        if st.button("Index", key="lib_index"):
            try:
                target = folder_under_roots(folder, cfg.roots)
            except Exception as e:
                show_error(e)
            else:
                cmd = [sys.executable, "-m", "clipsearch", "index", str(target), "--home", str(cfg.home),
                       "--no-progress", "--progress-file", str(progress_file)]
                if cfg.model:
                    cmd += ["--model", cfg.model]
                if cfg.db_url:
                    cmd += ["--db", cfg.db_url]
                progress_file.unlink(missing_ok=True)
                st.session_state["index_proc"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                                  stderr=subprocess.PIPE)

    def _running_writer() -> str | None:
        """'pid N since T' of an index run holding this home's writer lock (started here or from the CLI), read
        from the record it keeps in the lock file; never takes the lock, so a starting run is never refused."""
        try:
            rec = json.loads((cfg.home / "index.lock").read_text() or "{}")
            pid = int(rec.get("pid") or 0)
            if pid <= 0:
                return None
            os.kill(pid, 0)
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        return f"pid {pid}" + (f" since {rec['since'][:19].replace('T', ' ')}" if rec.get("since") else "")

    @st.fragment(run_every=1.0)
    def _progress() -> None:
        proc = st.session_state.get("index_proc")
        writer = _running_writer()
        if proc is None and writer is None:
            if st.session_state.pop("index_seen_running", False):
                st.rerun(scope="app")  # a run from the CLI ended: refresh the counts above
            return
        st.session_state["index_seen_running"] = True
        info = json.loads(progress_file.read_text() or "{}") if progress_file.is_file() else {}
        done, total = int(info.get("done") or 0), int(info.get("total") or 0)
        label = f"Indexing ({writer})" if writer else "Indexing"
        st.progress(min(1.0, done / max(1, total)), text=f"{label}: {done} / {total or '?'} photos")
        if proc is not None and proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
            st.session_state.pop("index_proc", None)
            st.session_state.pop("index_seen_running", None)
            if proc.returncode == 0:
                st.session_state["index_done"] = "Indexing finished."
                st.rerun(scope="app")  # the counts, spaces and failures above are read again
            st.error(err.splitlines()[-1] if err else f"indexing failed (exit {proc.returncode})")

    if st.session_state.get("index_done"):
        st.success(st.session_state.pop("index_done"))
    _progress()
    st.caption(f"catalog: {data['catalog']} · indexes: {data['index_dir']}")
except Exception as e:
    show_error(e)
