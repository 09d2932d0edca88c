"""Caption panel: images (a path or folder, and/or uploaded files), a prompt, Run -> ``vlmlab.caption``
with a progress bar, then the result's thumbnail gallery.

Progress: the run is handed to ``vlmlab.caption`` one batch at a time (the model stays loaded
between calls, and ``out=`` makes each call resume the same journal), so the bar moves after every
batch. With "profile" ticked the run is one call (one profile), and the bar fills at its end.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ipywidgets as w

from .common import message, notes


class CaptionPanel:
    """Attributes: ``images`` (Text: file, folder, or several separated by ';'), ``upload``
    (FileUpload), ``prompt`` (Text; empty = the model's default), ``out`` (Text: optional journal),
    ``profile`` (Checkbox), ``run_button``, ``progress`` (IntProgress), ``status`` (HTML),
    ``gallery`` (HTML: the CaptionResult's gallery), ``result`` (the last CaptionResult), ``widget``.
    ``settings`` is a callable returning the keywords for ``vlmlab.caption`` (model, gpus, dtype,
    batch_size) chosen elsewhere in the dashboard."""

    def __init__(self, settings=None, images: str = ""):
        self._settings = settings or (lambda: {})
        self._callbacks = []
        self._upload_dir: str | None = None
        self.result = None
        self.images = w.Text(value=images, description="images", placeholder="a file, a folder, or several separated by ;",
                             layout=w.Layout(width="40em"))
        self.upload = w.FileUpload(accept="image/*", multiple=True, description="Upload")
        self.prompt = w.Text(description="prompt", placeholder="empty: the model's default prompt",
                             layout=w.Layout(width="40em"))
        self.out = w.Text(description="journal", placeholder="optional .jsonl: a rerun resumes there",
                          layout=w.Layout(width="40em"))
        self.profile = w.Checkbox(value=False, description="profile (memory and latency)", indent=False)
        self.run_button = w.Button(description="Run", button_style="success", icon="play")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="0/0", bar_style="info")
        self.status = w.HTML()
        self.gallery = w.HTML()
        self.widget = w.VBox([w.HBox([self.images, self.upload]), self.prompt, self.out,
                              w.HBox([self.profile, self.run_button, self.progress]), self.status, self.gallery])
        self.widget.add_class("vlmlab-caption-panel")  # stable hooks for CSS and browser tests
        self.gallery.add_class("vlmlab-caption-gallery")
        self.run_button.on_click(lambda _: self.run())

    def on_result(self, callback):
        """Call ``callback(result)`` after each finished run."""
        self._callbacks.append(callback)

    # ---- inputs --------------------------------------------------------------------------------
    def inputs(self) -> list[str]:
        """The image paths to caption: the text field's files/folders (expanded), then the uploads."""
        from vlmlab.run.images import collect

        paths = []
        for part in (p.strip() for p in self.images.value.split(";")):
            if part:
                paths += [str(item.source) for item in collect(part)]
        return paths + self._save_uploads()

    def _save_uploads(self) -> list[str]:
        files = list(self.upload.value or ())
        if not files:
            return []
        if self._upload_dir is None:
            self._upload_dir = tempfile.mkdtemp(prefix="vlmlab-upload-")
        paths = []
        for f in files:
            path = Path(self._upload_dir, Path(f["name"]).name)
            path.write_bytes(bytes(f["content"]))
            paths.append(str(path))
        return paths

    # ---- the run -------------------------------------------------------------------------------
    def run(self):
        """Caption the inputs; show progress, then the gallery. Returns the CaptionResult (or None)."""
        import vlmlab

        self.run_button.disabled = True
        try:
            kwargs = {k: v for k, v in self._settings().items() if v is not None}
            if self.prompt.value.strip():
                kwargs["prompt"] = self.prompt.value.strip()
            if self.out.value.strip():
                kwargs["out"] = self.out.value.strip()
            paths = self.inputs()
            if not paths:
                raise ValueError("no images: type a file or folder, or upload some")
            self._progress(0, len(paths))
            self.status.value = message(f"captioning {len(paths)} image(s)…")
            if self.profile.value:
                results = [vlmlab.caption(paths, progress=False, profile=True, **kwargs)]
            else:
                step = kwargs.get("batch_size", 8)
                results = []
                for start in range(0, len(paths), step):
                    results.append(vlmlab.caption(paths[start:start + step], progress=False, **kwargs))
                    self._progress(start + len(results[-1]), len(paths))
            result = _combine(results)
        except Exception as err:  # noqa: BLE001 - a skin shows every failure to the user
            self.progress.bar_style = "danger"
            self.status.value = notes(error=f"{type(err).__name__}: {err}")
            return None
        finally:
            self.run_button.disabled = False
        self._progress(len(result), len(result))
        self.progress.bar_style = "success" if result.ok else "warning"
        self.result = result
        self.status.value = message(f"{result.model}: {result.summary()}", "#2a7a2a" if result.ok else "#c44e52")
        self.gallery.value = result._repr_html_()
        for callback in self._callbacks:
            callback(result)
        return result

    def _progress(self, done: int, total: int):
        self.progress.max = max(total, 1)
        self.progress.value = done
        self.progress.description = f"{done}/{total}"
        self.progress.bar_style = "info"

    def close(self):
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)
            self._upload_dir = None


def _combine(results):
    """One CaptionResult from the per-batch ones (rows in order; counters added)."""
    if len(results) == 1:
        return results[0]
    first, last = results[0], results[-1]
    merged = type(first)(rows=[r for res in results for r in res.rows], model=first.model, prompt=first.prompt,
                         prompt_text=last.prompt_text, out=first.out)
    merged.resumed = sum(r.resumed for r in results)
    merged.oom_retries = sum(r.oom_retries for r in results)
    merged.elapsed_s = sum(r.elapsed_s for r in results)
    merged.items = {k: v for r in results for k, v in r.items.items()}
    return merged
