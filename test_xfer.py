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
import re
import signal
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


#------------------------------------------------------------
# round trips through Receiver and Sender, in process
#------------------------------------------------------------

def _make_tree(root, files=(), dirs=()):
    """Create files (relpath -> bytes) and empty directories below root."""
    for rel, data in dict(files).items():
        write_file(os.path.join(root, *rel.split("/")), data)
    for rel in dirs:
        os.makedirs(os.path.join(root, *rel.split("/")), exist_ok=True)
    return root


class RoundTripTests(unittest.TestCase):
    BIG_SIZE = 24 * 1024 * 1024

    @classmethod
    def setUpClass(cls):
        cls._class_td = tempfile.TemporaryDirectory(prefix="xfer-test-class-")
        cls.class_dir = os.path.realpath(cls._class_td.name)
        cls.big = os.path.join(cls.class_dir, "big.bin")
        with open(cls.big, "wb") as f:
            for _ in range(cls.BIG_SIZE // (1 << 20)):
                f.write(os.urandom(1 << 20))
        cls.big_sha = sha256_file(cls.big)

    @classmethod
    def tearDownClass(cls):
        cls._class_td.cleanup()

    def test_mixed_files_identical_with_mtime(self):
        src, dst = temp_dir(self), temp_dir(self)
        paths = [
            write_file(os.path.join(src, "empty"), b""),
            write_file(os.path.join(src, "one"), b"x"),
            self.big,
            write_file(os.path.join(src, "ünï cødé ファイル.bin"), os.urandom(3000)),
        ]
        # Distinct mtimes with nanoseconds, none of them "now".
        for i, p in enumerate(paths):
            if p != self.big:
                t = 1500000000123456789 + i * 1000003
                os.utime(p, ns=(t, t))
        receiver = start_receiver(self, dst)
        jobs = send_files(receiver.address, paths)
        for job in jobs:
            self.assertEqual(job.state, "done", job.error)
        for p in paths:
            out = os.path.join(dst, os.path.basename(p))
            self.assertTrue(os.path.isfile(out), out)
            self.assertEqual(sha256_file(out), sha256_file(p) if p != self.big else self.big_sha)
            self.assertEqual(os.stat(out).st_size, os.stat(p).st_size)
            self.assertEqual(os.stat(out).st_mtime_ns, os.stat(p).st_mtime_ns, p)
        self.assertEqual(sorted(os.listdir(dst)), sorted(os.path.basename(p) for p in paths))

    @unittest.skipUnless(os.name == "posix", "permission bits are POSIX only")
    def test_permission_bits_kept(self):
        src, dst = temp_dir(self), temp_dir(self)
        a = write_file(os.path.join(src, "rw-r-----"), b"a")
        b = write_file(os.path.join(src, "rwxr-xr-x"), b"#!/bin/sh\n")
        os.chmod(a, 0o640)
        os.chmod(b, 0o755)
        receiver = start_receiver(self, dst)
        for job in send_files(receiver.address, [a, b]):
            self.assertEqual(job.state, "done", job.error)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(dst, "rw-r-----")).st_mode), 0o640)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(dst, "rwxr-xr-x")).st_mode), 0o755)

    @unittest.skipUnless(os.name == "posix", "permission bits are POSIX only")
    def test_setuid_setgid_sticky_stripped(self):
        src, dst = temp_dir(self), temp_dir(self)
        cases = {"suid": (0o4755, 0o755), "sgid": (0o2750, 0o750), "sticky": (0o1744, 0o744)}
        paths = []
        for name, (mode, _) in cases.items():
            p = write_file(os.path.join(src, name), name.encode())
            os.chmod(p, mode)
            paths.append(p)
        # The setuid case is the one the brief requires; the kernel must keep it.
        self.assertEqual(stat.S_IMODE(os.stat(paths[0]).st_mode), 0o4755)
        receiver = start_receiver(self, dst)
        for job in send_files(receiver.address, paths):
            self.assertEqual(job.state, "done", job.error)
        for name, (mode, want) in cases.items():
            if stat.S_IMODE(os.stat(os.path.join(src, name)).st_mode) != mode:
                continue  # this OS refused to set the bit on the source
            got = stat.S_IMODE(os.stat(os.path.join(dst, name)).st_mode)
            self.assertEqual(got, want, "%s arrived as %o" % (name, got))

    def test_queue_directory_tree_with_empty_dirs(self):
        src, dst = temp_dir(self), temp_dir(self)
        tree = _make_tree(os.path.join(src, "project"), {
            "top.txt": b"top",
            "a/one.bin": os.urandom(100),
            "a/b/c/deep.bin": os.urandom(5000),
            "a/b/empty-file": b"",
            "z/last": b"z",
        }, dirs=["empty", "a/b/empty-too", "z/y/x"])
        receiver = start_receiver(self, dst)
        with xfer.Sender(receiver.address) as sender:
            job = sender.queue(tree)
        self.assertEqual(job.kind, "dir")
        self.assertEqual(job.state, "done", job.error)
        out = os.path.join(dst, "project")
        self.assertEqual(os.listdir(dst), ["project"])
        self.assertEqual(tree_listing(out), tree_listing(tree))
        self.assertTrue(os.path.isdir(os.path.join(out, "empty")))
        self.assertTrue(os.path.isdir(os.path.join(out, "z", "y", "x")))
        for rel in ("top.txt", "a/one.bin", "a/b/c/deep.bin", "a/b/empty-file", "z/last"):
            self.assertEqual(sha256_file(os.path.join(out, *rel.split("/"))),
                             sha256_file(os.path.join(tree, *rel.split("/"))), rel)

    def test_queue_target_name_and_subdir(self):
        src, dst = temp_dir(self), temp_dir(self)
        p = write_file(os.path.join(src, "local-name.txt"), b"payload")
        q = write_file(os.path.join(src, "other.txt"), b"other")
        r = write_file(os.path.join(src, "third.txt"), b"third")
        receiver = start_receiver(self, dst)
        with xfer.Sender(receiver.address) as sender:
            j1 = sender.queue(p, target_name="remote-name.txt", subdir="in/box")
            j2 = sender.queue(q, subdir="only-subdir")
            j3 = sender.queue(r, target_name="renamed.txt")
        for job in (j1, j2, j3):
            self.assertEqual(job.state, "done", job.error)
        self.assertEqual(tree_listing(dst), ["in", "in/box", "in/box/remote-name.txt",
                                             "only-subdir", "only-subdir/other.txt",
                                             "renamed.txt"])
        with open(os.path.join(dst, "in", "box", "remote-name.txt"), "rb") as f:
            self.assertEqual(f.read(), b"payload")
        with open(os.path.join(dst, "renamed.txt"), "rb") as f:
            self.assertEqual(f.read(), b"third")

    def test_missing_input_fails_others_arrive(self):
        src, dst = temp_dir(self), temp_dir(self)
        a = write_file(os.path.join(src, "a.txt"), b"a")
        missing = os.path.join(src, "no-such-file.txt")
        b = write_file(os.path.join(src, "b.txt"), os.urandom(300000))  # not streamed
        receiver = start_receiver(self, dst)
        ja, jm, jb = send_files(receiver.address, [a, missing, b])
        self.assertEqual(jm.state, "failed")
        self.assertIsNotNone(jm.error)
        self.assertIn(missing, str(jm.error))
        self.assertEqual(ja.state, "done", ja.error)
        self.assertEqual(jb.state, "done", jb.error)
        self.assertEqual(sorted(os.listdir(dst)), ["a.txt", "b.txt"])
        self.assertEqual(sha256_file(os.path.join(dst, "b.txt")), sha256_file(b))

    def test_workers_1_and_8_deliver_200_files(self):
        src = temp_dir(self)
        rng = random.Random(1234)
        files = {}
        for i in range(200):
            rel = "d%02d/f%03d.bin" % (i % 13, i)
            files[rel] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 600)))
        tree = _make_tree(os.path.join(src, "many"), files)
        for workers in (1, 8):
            with self.subTest(workers=workers):
                dst = temp_dir(self)
                receiver = start_receiver(self, dst, fsync=False)
                with xfer.Sender(receiver.address, workers=workers) as sender:
                    job = sender.queue(tree)
                self.assertEqual(job.state, "done", job.error)
                self.assertEqual(job.files, 200)
                self.assertEqual(sender.files_done, 200)
                out = os.path.join(dst, "many")
                self.assertEqual(tree_listing(out), tree_listing(tree))
                for rel, data in files.items():
                    with open(os.path.join(out, *rel.split("/")), "rb") as f:
                        self.assertEqual(f.read(), data, rel)
                receiver.stop()

    def test_replace_existing_file_atomically(self):
        src, dst = temp_dir(self), temp_dir(self)
        old = write_file(os.path.join(dst, "same.bin"), b"old content " * 100)
        # A hard link to the old file keeps the old bytes only if the new file
        # was renamed over the name rather than written into the old inode.
        keep = os.path.join(temp_dir(self), "old-link")
        have_link = False
        try:
            os.link(old, keep)
            have_link = True
        except (OSError, AttributeError):
            pass
        new = write_file(os.path.join(src, "same.bin"), os.urandom(400000))
        receiver = start_receiver(self, dst)
        (job,) = send_files(receiver.address, [new])
        self.assertEqual(job.state, "done", job.error)
        self.assertEqual(sha256_file(os.path.join(dst, "same.bin")), sha256_file(new))
        self.assertEqual(os.listdir(dst), ["same.bin"])   # no partial file left behind
        if have_link:
            with open(keep, "rb") as f:
                self.assertEqual(f.read(), b"old content " * 100)

    def test_destination_name_is_directory_refused(self):
        src, dst = temp_dir(self), temp_dir(self)
        inside = write_file(os.path.join(dst, "thing", "inside.txt"), b"keep me")
        p = write_file(os.path.join(src, "thing"), b"a file called thing")
        ok = write_file(os.path.join(src, "fine"), b"fine")
        receiver = start_receiver(self, dst)
        job, job_ok = send_files(receiver.address, [p, ok])
        self.assertEqual(job.state, "failed")
        self.assertIn("directory", str(job.error).lower())
        self.assertEqual(job_ok.state, "done", job_ok.error)
        self.assertTrue(os.path.isdir(os.path.join(dst, "thing")))
        with open(inside, "rb") as f:
            self.assertEqual(f.read(), b"keep me")
        self.assertEqual(tree_listing(dst), ["fine", "thing", "thing/inside.txt"])


#------------------------------------------------------------
# configuration: files, environment, serverinfo.py
#------------------------------------------------------------

class ConfigTests(unittest.TestCase):
    def setUp(self):
        self.home = temp_dir(self)
        self.cwd = temp_dir(self)
        # expanduser("~") reads the process environment (macOS per-user path).
        patcher = mock.patch.dict(os.environ, {"HOME": self.home, "USERPROFILE": self.home})
        patcher.start()
        self.addCleanup(patcher.stop)
        self.environ = {"XDG_CONFIG_HOME": os.path.join(self.home, ".config"),
                        "APPDATA": self.home, "HOME": self.home}
        user = xfer.user_config_path(self.environ)
        self.assertTrue(os.path.abspath(user).startswith(self.home), user)

    def env(self, **extra):
        e = dict(self.environ)
        e.update(extra)
        return e

    def write(self, path, text):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def load(self, **extra):
        return xfer.load_config(path=None, environ=self.env(**extra), cwd=self.cwd)

    def resolve(self, to=None, token=None, **extra):
        environ = self.env(**extra)
        config = xfer.load_config(path=None, environ=environ, cwd=self.cwd)
        return tuple(xfer._resolve_target(config, to, token, environ))[:3]

    def test_alias_section(self):
        self.write(os.path.join(self.cwd, "xfer.ini"),
                   "[DEFAULT]\nport = 1111\ntoken = default-token\n\n"
                   "[pi]\nhost = 192.168.7.7\nport = 2222\ntoken = pi-token\n")
        self.assertEqual(self.resolve("pi"), ("192.168.7.7", 2222, "pi-token"))
        # A host that is not an alias gets the DEFAULT section's values.
        self.assertEqual(self.resolve("otherhost"), ("otherhost", 1111, "default-token"))

    def test_port_precedence(self):
        ini = os.path.join(self.cwd, "xfer.ini")
        info = os.path.join(self.cwd, "serverinfo.py")
        self.write(ini, "[DEFAULT]\nport = 3333\n")
        self.write(info, 'SERVER = ("10.1.1.1", 4444)\n')
        with self.subTest("flag"):
            self.assertEqual(self.resolve("10.1.1.1:6666", XFER_PORT="5555")[:2],
                             ("10.1.1.1", 6666))
        with self.subTest("environment"):
            self.assertEqual(self.resolve("10.1.1.1", XFER_PORT="5555")[:2],
                             ("10.1.1.1", 5555))
            self.assertEqual(self.resolve(None, XFER_PORT="5555")[:2], ("10.1.1.1", 5555))
        with self.subTest("config file"):
            self.assertEqual(self.resolve(None)[:2], ("10.1.1.1", 3333))
        os.unlink(ini)
        with self.subTest("serverinfo.py"):
            self.assertEqual(self.resolve(None)[:2], ("10.1.1.1", 4444))
        os.unlink(info)
        with self.subTest("default"):
            self.assertEqual(self.resolve("10.1.1.1")[:2], ("10.1.1.1", xfer.DEFAULT_PORT))

    def test_host_precedence(self):
        ini = os.path.join(self.cwd, "xfer.ini")
        info = os.path.join(self.cwd, "serverinfo.py")
        self.write(ini, "[DEFAULT]\nto = cfg-host\n")
        self.write(info, 'SERVER = ("info-host", 4444)\n')
        with self.subTest("flag"):
            self.assertEqual(self.resolve("flag-host", XFER_HOST="env-host")[0], "flag-host")
        with self.subTest("environment"):
            self.assertEqual(self.resolve(None, XFER_HOST="env-host")[0], "env-host")
        with self.subTest("config file"):
            self.assertEqual(self.resolve(None)[0], "cfg-host")
        os.unlink(ini)
        with self.subTest("serverinfo.py"):
            self.assertEqual(self.resolve(None)[:2], ("info-host", 4444))
        os.unlink(info)
        with self.subTest("nothing configured"):
            with self.assertRaises(xfer.ConfigError):
                self.resolve(None)

    def test_token_precedence(self):
        ini = os.path.join(self.cwd, "xfer.ini")
        self.write(ini, "[DEFAULT]\ntoken = cfg-token\n")
        with self.subTest("flag"):
            self.assertEqual(self.resolve("h", "flag-token", XFER_TOKEN="env-token")[2],
                             "flag-token")
        with self.subTest("environment"):
            self.assertEqual(self.resolve("h", None, XFER_TOKEN="env-token")[2], "env-token")
        with self.subTest("config file"):
            self.assertEqual(self.resolve("h", None)[2], "cfg-token")
        os.unlink(ini)
        with self.subTest("none"):
            self.assertIsNone(self.resolve("h", None)[2])

    def test_search_order_key_by_key(self):
        explicit = self.write(os.path.join(self.home, "explicit.ini"),
                              "[DEFAULT]\nport = 1001\n")
        self.write(os.path.join(self.cwd, "xfer.ini"),
                   "[DEFAULT]\nport = 1002\ntoken = cwd-token\n")
        user = self.write(xfer.user_config_path(self.environ),
                          "[DEFAULT]\nport = 1003\ntoken = user-token\nworkers = 7\n"
                          "[nas]\nhost = 10.9.9.9\n")
        config = self.load(XFER_CONFIG=explicit)
        self.assertEqual(config.port("DEFAULT"), 1001)
        self.assertEqual(config.value("DEFAULT", "token"), "cwd-token")
        self.assertEqual(config.int_value("DEFAULT", "workers"), 7)
        self.assertEqual(config.value("nas", "host"), "10.9.9.9")
        self.assertEqual(config.files, [explicit, os.path.join(self.cwd, "xfer.ini"), user])
        config = self.load()   # without XFER_CONFIG, ./xfer.ini comes first
        self.assertEqual(config.port("DEFAULT"), 1002)
        self.assertEqual(config.value("DEFAULT", "token"), "cwd-token")
        os.unlink(os.path.join(self.cwd, "xfer.ini"))
        config = self.load()
        self.assertEqual(config.port("DEFAULT"), 1003)
        self.assertEqual(config.value("DEFAULT", "token"), "user-token")

    def test_explicit_missing_file(self):
        missing = os.path.join(self.cwd, "nope.ini")
        with self.assertRaises(xfer.ConfigError) as cm:
            xfer.load_config(path=missing, environ=self.env(), cwd=self.cwd)
        self.assertIn(missing, str(cm.exception))

    def _config_error(self, text, resolve=False):
        path = self.write(os.path.join(self.cwd, "bad.ini"), text)
        with self.assertRaises(xfer.ConfigError) as cm:
            config = xfer.load_config(path=path, environ=self.env(), cwd=self.cwd)
            if resolve:
                xfer._resolve_target(config, "somehost", None, self.env())
        return path, cm.exception

    def test_syntax_error_names_file_and_line(self):
        path, e = self._config_error("[DEFAULT]\nport = 1\nthis line has no equals sign\n")
        self.assertIn("%s:3" % path, str(e))
        self.assertEqual(e.lineno, 3)

    def test_duplicate_key_names_file_line_key(self):
        path, e = self._config_error("[pi]\nhost = a\nport = 1\nhost = b\n")
        self.assertIn("%s:4" % path, str(e))
        self.assertIn("host", str(e))
        self.assertIn("duplicate", str(e).lower())

    def test_unknown_key_names_file_line_key(self):
        path, e = self._config_error("[DEFAULT]\nport = 1\n\n[pi]\nhost = a\nhots = b\n")
        self.assertIn("%s:6" % path, str(e))
        self.assertIn("hots", str(e))
        self.assertIn("unknown", str(e).lower())

    def test_bad_port_names_file_line_key(self):
        path, e = self._config_error("[DEFAULT]\ntoken = t\nport = abc\n", resolve=True)
        self.assertIn("%s:3" % path, str(e))
        self.assertIn("port", str(e))
        self.assertIn("abc", str(e))

    def test_serverinfo_tuple(self):
        self.write(os.path.join(self.cwd, "serverinfo.py"),
                   '# legacy\nSERVER = ("192.168.1.20", 5001)\n')
        config = self.load()
        self.assertEqual(config.serverinfo[:2], ("192.168.1.20", 5001))
        self.assertEqual(self.resolve(None)[:2], ("192.168.1.20", 5001))

    def test_serverinfo_separate_assignments(self):
        self.write(os.path.join(self.cwd, "serverinfo.py"),
                   'ip = "192.168.1.21"\nport = 5002\n')
        self.assertEqual(self.resolve(None)[:2], ("192.168.1.21", 5002))

    def test_serverinfo_is_not_executed(self):
        pwned = os.path.join(self.cwd, "PWNED")
        pwned2 = os.path.join(self.cwd, "PWNED2")
        self.write(os.path.join(self.cwd, "serverinfo.py"),
                   "open(%r, 'w').write('x')\n"
                   "import os\n"
                   "os.system('echo > ' + %r)\n"
                   "SERVER = ('192.168.1.22', 5003)\n"
                   "port = int(open(%r, 'w').write('y'))\n" % (pwned, pwned2, pwned))
        self.assertEqual(self.resolve(None)[:2], ("192.168.1.22", 5003))
        self.assertFalse(os.path.exists(pwned))
        self.assertFalse(os.path.exists(pwned2))

    def test_alias_with_port(self):
        self.write(os.path.join(self.cwd, "xfer.ini"),
                   "[pi]\nhost = 192.168.7.8\nport = 2222\ntoken = pi-token\n")
        self.assertEqual(self.resolve("pi:2000"), ("192.168.7.8", 2000, "pi-token"))

    def test_ipv6_literal_with_port(self):
        self.assertEqual(self.resolve("[::1]:5000")[:2], ("::1", 5000))
        self.assertEqual(self.resolve("[fe80::2]:22598")[:2], ("fe80::2", 22598))

    def test_ipv6_literal_without_port(self):
        # BUG in xfer._split_host_port: "[::1]" without a port passes port=-1
        # to _parse_target, which rejects it ("port must be ... not -1").
        self.assertEqual(self.resolve("[::1]")[:2], ("::1", xfer.DEFAULT_PORT))


#------------------------------------------------------------
# the command line, in subprocesses
#------------------------------------------------------------

TOKEN = "cli-test-token"


def _free_port():
    """A port that was bound and closed again, so nothing listens on it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((HOST, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _FakeServer:
    """Accepts connections on 127.0.0.1:0 and answers each with a bad preface."""

    def __init__(self, test, reply):
        self.reply = reply
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.connections = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        test.addCleanup(self.close)

    def _run(self):
        deadline = time.monotonic() + TIMEOUT
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    got = b""
                    while len(got) < 8 + 5 + 32:     # client preface + HELLO
                        data = conn.recv(4096)
                        if not data:
                            break
                        got += data
                    conn.sendall(self.reply)
                    recv_until_closed(conn)
                except OSError:
                    pass

    def close(self):
        self.stop.set()
        self.thread.join(TIMEOUT)
        self.sock.close()


class CommandLineTests(unittest.TestCase):
    def setUp(self):
        self.home = temp_dir(self)
        self.cwd = temp_dir(self)
        self.env = isolated_env(self.home)

    def serve(self, dst, token=TOKEN):
        return spawn_server(self, "--dir", dst, "--token", token, cwd=self.cwd, env=self.env)

    def xfer(self, *args, env=None):
        return run_xfer(*args, cwd=self.cwd, env=env or self.env)

    def assertOneLineError(self, result):
        self.assertNotIn("Traceback", result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        return lines[0]

    def test_serve_prints_listening_line_first(self):
        dst = temp_dir(self)
        proc = subprocess.Popen([sys.executable, "-u", XFER, "serve", "--host", HOST,
                                 "--port", "0", "--dir", dst, "--token", TOKEN],
                                cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, universal_newlines=True)

        def cleanup():
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=TIMEOUT)
        self.addCleanup(cleanup)
        lines = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=TIMEOUT)
        m = re.match(r"listening on 127\.0\.0\.1:(\d+)\n\Z", line)
        self.assertIsNotNone(m, repr(line))
        port = int(m.group(1))
        self.assertNotEqual(port, 0)
        p = write_file(os.path.join(temp_dir(self), "probe.txt"), b"probe")
        (job,) = send_files((HOST, port), [p], token=TOKEN)
        self.assertEqual(job.state, "done", job.error)
        self.assertTrue(os.path.isfile(os.path.join(dst, "probe.txt")))

    def test_send_files(self):
        src, dst = temp_dir(self), temp_dir(self)
        a = write_file(os.path.join(src, "a.txt"), b"alpha")
        b = write_file(os.path.join(src, "b b.bin"), os.urandom(300000))
        _, port = self.serve(dst)
        r = self.xfer("send", "--to", "%s:%d" % (HOST, port), "--token", TOKEN, a, b)
        self.assertEqual(r.returncode, xfer.EXIT_OK, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        self.assertTrue(r.stdout.splitlines()[-1].startswith("sent 2 files"), r.stdout)
        self.assertEqual(sorted(os.listdir(dst)), ["a.txt", "b b.bin"])
        self.assertEqual(sha256_file(os.path.join(dst, "b b.bin")), sha256_file(b))

    def test_send_dir_nested_tree(self):
        src, dst = temp_dir(self), temp_dir(self)
        tree = _make_tree(os.path.join(src, "site"), {
            "index.html": b"<html>",
            "assets/css/main.css": b"body{}",
            "assets/img/logo.png": os.urandom(2000),
        }, dirs=["empty", "assets/fonts"])
        _, port = self.serve(dst)
        r = self.xfer("send-dir", "--to", "%s:%d" % (HOST, port), "--token", TOKEN, tree)
        self.assertEqual(r.returncode, xfer.EXIT_OK, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        self.assertEqual(tree_listing(os.path.join(dst, "site")), tree_listing(tree))
        self.assertTrue(os.path.isdir(os.path.join(dst, "site", "empty")))
        self.assertEqual(sha256_file(os.path.join(dst, "site", "assets", "img", "logo.png")),
                         sha256_file(os.path.join(tree, "assets", "img", "logo.png")))

    def test_missing_input_file(self):
        src, dst = temp_dir(self), temp_dir(self)
        a = write_file(os.path.join(src, "here.txt"), b"here")
        missing = os.path.join(src, "not-here.txt")
        _, port = self.serve(dst)
        r = self.xfer("send", "--to", "%s:%d" % (HOST, port), "--token", TOKEN, a, missing)
        self.assertEqual(r.returncode, xfer.EXIT_FAILED, r.stderr)
        self.assertNotIn("Traceback", r.stderr)
        self.assertIn(missing, r.stderr)
        self.assertEqual(os.listdir(dst), ["here.txt"])

    def test_unreachable_server(self):
        p = write_file(os.path.join(temp_dir(self), "f.txt"), b"f")
        port = _free_port()
        started = time.monotonic()
        r = self.xfer("send", "--to", "%s:%d" % (HOST, port), "--token", TOKEN, p)
        self.assertLess(time.monotonic() - started, TIMEOUT)
        self.assertEqual(r.returncode, xfer.EXIT_CONNECT, r.stderr)
        line = self.assertOneLineError(r)
        self.assertIn(str(port), line)

    def test_wrong_token(self):
        dst = temp_dir(self)
        p = write_file(os.path.join(temp_dir(self), "f.txt"), b"f")
        _, port = self.serve(dst, token="right-token")
        r = self.xfer("send", "--to", "%s:%d" % (HOST, port), "--token", "wrong-token", p)
        self.assertEqual(r.returncode, xfer.EXIT_AUTH, r.stderr)
        line = self.assertOneLineError(r)
        self.assertIn("token", line.lower())
        self.assertEqual(tree_listing(dst), [])

    def test_version_mismatch(self):
        fake = _FakeServer(self, struct.pack("!4sHH", b"XFER", 99, 0))
        p = write_file(os.path.join(temp_dir(self), "f.txt"), b"f")
        r = self.xfer("send", "--to", "%s:%d" % (HOST, fake.port), "--token", TOKEN, p)
        self.assertEqual(r.returncode, xfer.EXIT_PROTOCOL, r.stderr)
        line = self.assertOneLineError(r)
        self.assertIn("version", line.lower())
        self.assertIn("99", line)
        self.assertGreaterEqual(fake.connections, 1)

    def _stop_with(self, signum):
        dst = temp_dir(self)
        proc, port = self.serve(dst)
        p = write_file(os.path.join(temp_dir(self), "f.txt"), b"f")
        # A finished transfer first: the server is fully up and serving.
        (job,) = send_files((HOST, port), [p], token=TOKEN)
        self.assertEqual(job.state, "done", job.error)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
        self.assertEqual(proc.returncode, 0, err)
        self.assertNotIn("Traceback", err)

    @unittest.skipIf(os.name == "nt", "POSIX signals")
    def test_sigint_stops_server_cleanly(self):
        self._stop_with(signal.SIGINT)

    @unittest.skipIf(os.name == "nt", "POSIX signals")
    def test_sigterm_stops_server_cleanly(self):
        self._stop_with(signal.SIGTERM)

    def test_usage_errors_exit_2(self):
        for argv in ([], ["send"], ["send-dir"], ["bogus-command"]):
            with self.subTest(argv=argv):
                err = io.StringIO()
                with contextlib.redirect_stderr(err), \
                        contextlib.redirect_stdout(io.StringIO()):
                    with self.assertRaises(SystemExit) as cm:
                        xfer.main(argv)
                self.assertEqual(cm.exception.code, xfer.EXIT_USAGE)
                self.assertIn("usage", err.getvalue().lower())

    def test_bad_config_file(self):
        bad = os.path.join(self.cwd, "bad.ini")
        with open(bad, "w") as f:
            f.write("[DEFAULT]\nport = 1\nport = 2\n")
        p = write_file(os.path.join(temp_dir(self), "f.txt"), b"f")
        r = self.xfer("send", "--config", bad, "--to", "%s:%d" % (HOST, _free_port()),
                      "--token", TOKEN, p)
        self.assertEqual(r.returncode, xfer.EXIT_USAGE, r.stderr)
        line = self.assertOneLineError(r)
        self.assertIn("%s:3" % bad, line)

    def test_token_from_environment(self):
        src, dst = temp_dir(self), temp_dir(self)
        p = write_file(os.path.join(src, "f.txt"), b"env token")
        _, port = self.serve(dst, token="env-secret")
        env = dict(self.env, XFER_TOKEN="env-secret")
        r = self.xfer("send", "--to", "%s:%d" % (HOST, port), p, env=env)
        self.assertEqual(r.returncode, xfer.EXIT_OK, r.stderr)
        self.assertEqual(os.listdir(dst), ["f.txt"])
        # And the environment really is what authenticated: without it, no entry.
        r = self.xfer("send", "--to", "%s:%d" % (HOST, port), "--token", "nope", p)
        self.assertEqual(r.returncode, xfer.EXIT_AUTH, r.stderr)

    def test_to_alias_from_ini_in_cwd(self):
        src, dst = temp_dir(self), temp_dir(self)
        p = write_file(os.path.join(src, "via-alias.txt"), b"alias")
        _, port = self.serve(dst)
        with open(os.path.join(self.cwd, "xfer.ini"), "w") as f:
            f.write("[DEFAULT]\nport = %d\n\n[box]\nhost = %s\nport = %d\ntoken = %s\n"
                    % (_free_port(), HOST, port, TOKEN))
        r = self.xfer("send", "--to", "box", "--token", TOKEN, p)
        self.assertEqual(r.returncode, xfer.EXIT_OK, r.stderr)
        self.assertTrue(r.stdout.startswith("sent 1 file"), r.stdout)
        self.assertEqual(os.listdir(dst), ["via-alias.txt"])


if __name__ == "__main__":
    unittest.main()


if __name__ == "__main__":
    unittest.main()
