"""Worker-side fault injection for the fault suite (imported inside spawned worker processes).

``poison``: a pool task that kills its own process (SIGKILL, as the OOM killer would) always or
only the first time. :func:`sitecustomize_dir`: a folder with a ``sitecustomize.py`` that, in every
new interpreter started with it on ``PYTHONPATH``, wraps ``tgdp.data.clip_decode.decode_clip``
before anything imports it (so ``tgdp.prepare`` binds the wrapper under any module name, including
the ``__mp_main__`` of a worker of ``python -m tgdp.prepare``): clips named in ``TGDP_FAULT_KILL``
kill their worker (``id`` always, ``id:once`` the first time only) and clips in ``TGDP_FAULT_SLOW``
sleep first.
"""

import os
import signal
from pathlib import Path


def poison(task):
    value, mode, marker = task
    if mode == "always" or (mode == "once" and not Path(marker).exists()):
        if mode == "once":
            Path(marker).write_text("died once")
        os.kill(os.getpid(), signal.SIGKILL)
    return value * 2


SITECUSTOMIZE = '''
import os
if os.environ.get("TGDP_FAULT_KILL") or os.environ.get("TGDP_FAULT_SLOW"):
    import signal, time
    from pathlib import Path
    import tgdp.data.clip_decode as _cd
    _real = _cd.decode_clip
    def _decode(item, **kw):
        for spec in filter(None, os.environ.get("TGDP_FAULT_KILL", "").split(",")):
            cid, _, once = spec.partition(":")
            marker = Path(os.environ["TGDP_FAULT_DIR"]) / f"died-{cid}"
            if item.id == cid and not (once and marker.exists()):
                marker.write_text("x")
                os.kill(os.getpid(), signal.SIGKILL)
        if item.id in os.environ.get("TGDP_FAULT_SLOW", "").split(","):
            time.sleep(60)
        return _real(item, **kw)
    _cd.decode_clip = _decode
'''


def sitecustomize_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return root
