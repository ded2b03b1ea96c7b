"""Container launcher of the process kubelet: ``python podexec.py SPEC.json``.

Runs as the container's own process (it ends in execve, so the container keeps this PID):

1. asks to be SIGKILLed when the kubelet thread that started it dies (PR_SET_PDEATHSIG);
2. enters a new mount namespace and a new UTS namespace (unshare), makes every mount private
   so nothing propagates back to the host, and sets the hostname to the pod's hostname;
3. bind-mounts each volume (configMap, secret, emptyDir, downwardAPI, projected) and the
   termination-message file at its mount path, read-only where asked — visible to this process
   tree only;
4. changes to the working directory and execs the command with the pod's environment.

A failure before the exec writes a line to SPEC["start_error_file"] and exits 128 (the kubelet
reports that as reason StartError, like a container runtime).
"""

import ctypes
import json
import os
import signal
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    try:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != spec["parent_pid"]:
            os._exit(137)  # the kubelet is already gone
        if spec.get("namespaces", True):
            check(libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare")
            check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
            host = spec.get("hostname", "").encode()
            if host:
                check(libc.sethostname(host, len(host)), "sethostname")
            for m in spec["mounts"]:
                src, dst = m["source"].encode(), m["target"].encode()
                check(libc.mount(src, dst, None, MS_BIND | MS_REC, None), f"bind {m['source']} -> {m['target']}")
                if m.get("readOnly"):
                    check(libc.mount(b"none", dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY, None),
                          f"read-only {m['target']}")
        os.chdir(spec["cwd"])
        os.execvpe(spec["argv"][0], spec["argv"], spec["env"])
    except OSError as e:
        with open(spec["start_error_file"], "w") as f:
            f.write(f"failed to start container: {e}")
        print(f"failed to start container: {e}", file=sys.stderr, flush=True)
        os._exit(128)


if __name__ == "__main__":
    main()
