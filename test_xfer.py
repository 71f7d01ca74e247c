"""Tests for xfer.py.  Run with:  python -m unittest -v test_xfer

Servers listen on 127.0.0.1 port 0; nothing waits by sleeping: tests wait on
readiness lines, Events, or results that mean "the file is durably in place".
"""
import contextlib
import hashlib
import io
import os
import queue
import random
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

import xfer

HOST = "127.0.0.1"
TIMEOUT = 20.0   # hang detector only, never a wait
XFER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xfer.py")


#------------------------------------------------------------
# helpers
#------------------------------------------------------------

def temp_dir(test):
    """A fresh temporary directory removed when the test ends."""
    td = tempfile.TemporaryDirectory(prefix="xfer-test-")
    test.addCleanup(td.cleanup)
    return os.path.realpath(td.name)


def start_receiver(test, directory, **kw):
    """A Receiver on 127.0.0.1, port 0, stopped when the test ends."""
    kw.setdefault("host", HOST)
    kw.setdefault("port", 0)
    receiver = xfer.Receiver(directory, **kw)
    receiver.start()
    test.addCleanup(receiver.stop)
    return receiver


def write_file(path, data):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return path


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_listing(root):
    """Sorted relative paths of every file and directory below root."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def send_files(address, paths, **kw):
    """Send paths with a Sender and wait; return the list of Jobs."""
    with xfer.Sender(address, **kw) as sender:
        jobs = [sender.queue(p) for p in paths]
    return jobs


def isolated_env(home):
    """Environment for a subprocess whose config files live only under home."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith("XFER_"):
            del env[key]
    env.update(HOME=home, USERPROFILE=home, APPDATA=home,
               XDG_CONFIG_HOME=os.path.join(home, ".config"), PYTHONIOENCODING="utf-8")
    return env


def run_xfer(*args, cwd=None, env=None, timeout=TIMEOUT):
    """Run xfer.py in a subprocess to completion; return CompletedProcess."""
    return subprocess.run([sys.executable, XFER] + list(args), cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def spawn_server(test, *args, cwd=None, env=None):
    """Start `xfer.py serve ARGS` and wait for its readiness line; return (proc, port).

    The first stdout line is read in a helper thread, so a server that never
    prints fails the test after TIMEOUT instead of hanging it.
    """
    proc = subprocess.Popen([sys.executable, "-u", XFER, "serve", "--host", HOST,
                             "--port", "0"] + list(args),
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)

    def cleanup():
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)
    test.addCleanup(cleanup)
    lines = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=TIMEOUT)
    except queue.Empty:
        proc.kill()
        test.fail("server printed no readiness line; stderr: %s" % proc.communicate()[1])
    if not line.startswith("listening on "):
        proc.kill()
        test.fail("unexpected first line %r; stderr: %s" % (line, proc.communicate()[1]))
    return proc, int(line.rsplit(":", 1)[1])


def raw_connect(address):
    """A plain socket to the server, for hostile-client tests."""
    sock = socket.create_connection(address, timeout=TIMEOUT)
    return sock


def recv_until_closed(sock):
    """Read until the peer closes; return everything read."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


#------------------------------------------------------------
# basic round trip (more in the classes below)
#------------------------------------------------------------

class SmokeTests(unittest.TestCase):
    def test_send_one_file(self):
        src, dst = temp_dir(self), temp_dir(self)
        path = write_file(os.path.join(src, "a.bin"), os.urandom(1000))
        receiver = start_receiver(self, dst)
        (job,) = send_files(receiver.address, [path])
        self.assertEqual(job.state, "done", job.error)
        self.assertEqual(sha256_file(os.path.join(dst, "a.bin")), sha256_file(path))


if __name__ == "__main__":
    unittest.main()
