"""Test-only fault injection: the OS refuses a write, in a real ``irnn`` subprocess.

Python imports ``sitecustomize`` at start-up from any folder on ``PYTHONPATH``; the tests put
this folder there only for the commands that should meet a failing disk, and say how in
``IRNN_TEST_FAULT=ERRNO:TEXT:MODE:N`` (unset: nothing changes):

- ``open``: from the N-th opening for writing of a path that contains TEXT on, the opening fails
  with ERRNO (``EROFS``, ``EACCES``, ``ENOSPC``...), as a read-only or full filesystem answers.
- ``write``: the N-th ``os.write`` to a file whose path contains TEXT writes half of its bytes,
  and writing the rest fails with ERRNO: a disk that fills up in the middle of a line.
"""
import builtins
import errno
import os

_spec = os.environ.get("IRNN_TEST_FAULT")
if _spec:
    _name, _text, _mode, _nth = _spec.split(":")
    _code, _nth = getattr(errno, _name), int(_nth)
    _seen = {"count": 0, "torn": False}

    def _fail(path):
        raise OSError(_code, os.strerror(_code), path)

    def _due(path) -> bool:
        if _text not in os.fsdecode(path):
            return False
        _seen["count"] += 1
        return _seen["count"] >= _nth

    if _mode == "open":
        _os_open, _open = os.open, builtins.open

        def _fault_os_open(path, flags, mode=0o777, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _due(path):
                _fail(os.fsdecode(path))
            return _os_open(path, flags, mode, *args, **kwargs)

        def _fault_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and _due(file):
                _fail(os.fsdecode(file))
            return _open(file, mode, *args, **kwargs)

        os.open, builtins.open = _fault_os_open, _fault_open
    elif _mode == "write":
        _os_write = os.write

        def _fault_write(fd, data):
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if _text in path:
                if _seen["torn"]:
                    _fail(path)
                if _due(path) and len(data) > 1:
                    _seen["torn"] = True
                    return _os_write(fd, bytes(data[:len(data) // 2]))
            return _os_write(fd, data)

        os.write = _fault_write
    else:
        raise SystemExit(f"IRNN_TEST_FAULT: unknown mode {_mode!r}; use open or write")
