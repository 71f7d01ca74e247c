#!/usr/bin/env python3
"""xfer -- move files between machines on a local network, safely and fast.

Command line:
    python3 xfer.py serve [--dir DIR] [--host ADDR] [--port N] [--once] [--on-receive CMD]
    python3 xfer.py send [--to HOST[:PORT][:DIR]]... [--json] FILE... [HOST[:PORT]:[DIR]]
    python3 xfer.py send-dir [--to HOST[:PORT][:DIR]]... [--json] DIR... [HOST[:PORT]:[DIR]]
    python3 xfer.py get HOST[:PORT]:PATH... [LOCAL_DIR]     (serve --allow-get)
    python3 xfer.py ls [-R] HOST[:PORT]:[PATH]
    python3 xfer.py ping [HOST[:PORT]]

Library (README "Python API"):
    import xfer
    with xfer.Sender("pi", token="...") as sender:
        job = sender.queue("render.exr")

Public names are listed in __all__.  The wire format is specified byte by
byte in README.md, section "Protocol"; comments of the form "(Protocol 3.2)"
point there.  Standard library only; Python 3.8+; Linux, macOS, Windows.

Threads: who starts each, and what it does.
    the caller's       main(), Receiver.start()/stop(), Sender.queue()/poll()/
                       close(); with dispatch="poll" every callback runs here,
                       inside poll(); serve's main thread waits for a signal
    xfer-receiver      Receiver.start(): accepts connections (_Server); refuses
                       one over the cap or backing off, at once, itself
    xfer-connection    _Server, one per connection: _ReceiveSession, the
                       handshake, then each request in order until BYE
    xfer-hash          a connection, while a large body arrives: hashes the
                       chunks already read, beside the copy
    xfer-sweep         Receiver.start(), once: deletes stale partial files
    xfer-feeder        Sender, at the first queue(): walks trees (_walk_tree)
                       and hands the workers jobs in batches
    xfer-worker-N      Sender, `workers` of them: a _Worker drives one _Link
                       (connect, handshake, CHECK, MKDIR, FILE; reconnects)
    xfer-link-reader   each _Link: reads the answers, ends their jobs and
                       wakes the worker waiting for them (Sender._nudge)
    xfer-ping          Sender.ping(): one connection, PING, PONG
    xfer-watch         Sender.watch(), one per Watch: looks at the folder,
                       queues each file once complete, collects the outcomes
    xfer-get, -list    Sender.get()/list(): one connection, GET or LIST; the
                       files arrive through _Pull into a _Store of LOCAL_DIR
    xfer-log           serve: writes its log in batches (_Lines)
    xfer-hook          serve --on-receive: runs the hooks (HOOK_WORKERS)

Data path of one file, send to published name (README "Protocol" 4):
    _cmd_send: _parse_address, _resolve_target (_Settings), Sender.queue
    -> xfer-feeder: _tree_totals adds up a tree's size and hands on its
    first files as it finds them (asked about meanwhile, told once the
    size is known), then _walk_tree hands on the rest, each with one stat
    -> xfer-worker: _Link asks with CHECKS, one per run of
    files of a directory (skip what the receiver has), then sends: a small
    file (<= SMALL_MAX), read whole and hashed by _Link._batched, joins the
    BATCH being gathered, which goes out
    (one frame of headers and digests, then the bodies) when it is full or
    before the worker would wait; a large one goes as FILE, waits for ACCEPT
    (its resume offset), then its body in chunks and TRAILER with the sha256
    -> xfer-connection: _ReceiveSession._on_batch (or _on_file) hands each
    body to _sink: an _IncomingFile the _Store admits (path rules, the
    overwrite policy), a .xfer-part.* temporary file taking the body as it
    is hashed (beside the copy on xfer-hash for a large one), the sha256
    checked and the file sealed; or a _Drain that reads and drops a refused
    body, so the stream stays in step
    -> _GroupCommit, when no request is waiting or the group is full: syncs
    the sealed files, publishes each under its final name (_Store), syncs
    their directories, counts and reports each once (on_file), and sets each
    file's verdict; then the answers go out in one write: one RESULTS per
    BATCH or CHECKS, one RESULT per FILE
    -> xfer-link-reader: each answer ends its Job (_Ledger); on_done runs
    through the _Dispatcher; send's _Report prints it.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import hmac
import io
import itertools
import math
import os
import queue
import re
import secrets
import selectors
import socket
import socketserver
import stat
import struct
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # Windows: the banner finds its addresses another way
    fcntl = None


class _Lazy:
    """A module imported when first used, then bound in its place.

    `import xfer` and a command's start-up load only what they use: the CLI
    parser, the config reader, JSON, TLS, signals, subprocesses and the
    rest come in with the first function that needs them (README
    "Performance")."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attr)


argparse = _Lazy("argparse")
ast = _Lazy("ast")
configparser = _Lazy("configparser")
fnmatch = _Lazy("fnmatch")
ipaddress = _Lazy("ipaddress")
json = _Lazy("json")
shlex = _Lazy("shlex")
shutil = _Lazy("shutil")
signal = _Lazy("signal")
ssl = _Lazy("ssl")
subprocess = _Lazy("subprocess")
tempfile = _Lazy("tempfile")
traceback = _Lazy("traceback")
unicodedata = _Lazy("unicodedata")
zipfile = _Lazy("zipfile")


def _require_ssl():
    """Raise ConfigError on a Python built without OpenSSL (TLS is then unavailable)."""
    try:
        __import__("ssl")
    except ImportError:
        raise ConfigError("this Python has no ssl module, so TLS is unavailable") from None


__version__ = "0.1.0"
__all__ = [
    # library API
    "Sender", "Receiver", "Job", "FileInfo", "SessionInfo", "load_config", "Config", "main",
    "config_paths", "user_config_path", "cert_fingerprint", "Watch", "WatchEvent", "Entry",
    # errors
    "XferError", "ConfigError", "ConnectError", "AuthError", "ProtocolError",
    "VersionMismatchError", "ConnectionClosedError", "RemoteError",
    "UnsafePathError", "IntegrityError",
    # constants
    "DEFAULT_PORT", "PROTOCOL_VERSION", "MAX_PATH_BYTES", "MAX_FRAME_PAYLOAD",
    "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_CONNECT", "EXIT_AUTH",
    "EXIT_PROTOCOL", "EXIT_INTERRUPTED",
]

#------------------------------------------------------------
# constants and limits
#------------------------------------------------------------

#: TCP port used when none is configured ("XF" read as a 16-bit number).
DEFAULT_PORT = 22598
#: Longest relative path accepted, in UTF-8 bytes.
MAX_PATH_BYTES = 4096
#: Longest single path component, in UTF-8 bytes (the common filesystem limit).
MAX_NAME_BYTES = 255
#: Deepest directory nesting accepted.
MAX_PATH_DEPTH = 64
#: Largest control frame payload; file contents are streamed, not framed.
MAX_FRAME_PAYLOAD = 64 * 1024
#: Files up to this size are sent without waiting for the receiver's ACCEPT.
STREAM_MAX = 256 * 1024
#: Files up to this size travel many to a BATCH frame (Protocol 4.12), their
#: bodies concatenated after it; larger ones go one by one as FILE, with ACCEPT
#: (and resume).  The sizes a FILE may stream without ACCEPT, the same.
SMALL_MAX = STREAM_MAX
#: Most bytes of body one BATCH carries, and most files one BATCH or CHECKS
#: asks about; a receiver refuses a batch over either before reading a body.
BATCH_BYTES = 1024 * 1024
BATCH_FILES = 128
#: Files a sender keeps in flight on one connection before waiting for results.
WINDOW = 256
#: Chunk size for file bodies on both ends.
CHUNK = 256 * 1024
#: Receiver default: concurrent connections before "busy".
DEFAULT_MAX_CONNECTIONS = 64
#: Sender: connections (workers) at most; a receiver takes half its
#: connections from one address by default, 32.
MAX_WORKERS = 64
#: Receiver default: seconds a connection may stay silent.
DEFAULT_IDLE_TIMEOUT = 60.0
#: Default seconds from accept (receiver) or connect (sender) to a finished
#: handshake: a peer that takes the connection and then hangs is given up on
#: long before DEFAULT_IO_TIMEOUT.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Sender default: seconds to wait for a TCP connection.
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Sender default: seconds to wait on a silent server.
DEFAULT_IO_TIMEOUT = 60.0
#: Sender: after a connection attempt failed for good (its retries spent),
#: the next attempt waits this many seconds, counted from the failure; each
#: failure in a row takes the next delay, and the last one is the cap.  A
#: long-lived Sender thus keeps trying for new jobs, at most every 15 s.
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)
#: Temporary files start with this; the receiver refuses names that do.
PARTIAL_PREFIX = ".xfer-part."
#: Receiver default: partial files older than this (seconds) are deleted.
DEFAULT_PARTIAL_MAX_AGE = 7 * 24 * 3600
#: Receiver default: seconds stop() lets files in flight finish.
DEFAULT_GRACE = 5.0
#: The longest time in seconds an option takes: a socket or a wait takes no longer.
SECONDS_MAX = 10**9
#: Receiver: seconds stop() then waits for the connections it closed to end;
#: what one still running reports later is dropped (README "Python API").
UNWIND_TIMEOUT = 2.0
#: serve --on-receive: seconds a hook may run, hooks run at once, hooks waiting.
DEFAULT_HOOK_TIMEOUT = 300.0
HOOK_WORKERS = 2
HOOK_QUEUE = 1000
#: serve --once: seconds to wait for another connection of the same sender
#: after the last one ended with BYE, and after one broke (it may retry).
ONCE_LINGER = 1.0
ONCE_RETRY_LINGER = 12.0
#: serve: lines of its log wait at most this many seconds to be written, so a
#: burst of files costs one write, not one per file.
LOG_DELAY = 0.05
#: Receiver: a connection holding a resumable partial that another one asks
#: for, silent this many seconds, is taken for dead and cut (README "Resume").
CLAIM_SILENCE = 1.0
#: Receiver: after an address's Nth wrong token in a row, seconds before its
#: next try is looked at (the last entry repeats); a right token forgets it,
#: as do AUTH_FORGET seconds without a wrong one.  Tries meanwhile are
#: refused "busy" at once, on the accepting thread (README "Hardened receiver").
AUTH_BACKOFF = (0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
AUTH_FORGET = 15 * 60.0
#: Receiver: addresses whose wrong tokens it remembers at most (oldest go first).
AUTH_MAX_ADDRESSES = 4096
#: Receiver: after an address's first wrong token is logged, the next ones
#: are summed up in one line at most this often (seconds).
AUTH_LOG_INTERVAL = 10.0
#: Receiver: a body must bring at least BODY_MIN_BYTES (or its rest) in every
#: BODY_WINDOW seconds, or its connection is dropped (a large file keeps its
#: partial).  About 3 KB/s, far below the worst Wi-Fi, with time for stalls.
BODY_MIN_BYTES = 100 * 1000
BODY_WINDOW = 30.0
#: Receiver: pause after a failed accept() (out of descriptors), doubling up
#: to the second value while it keeps failing.
ACCEPT_PAUSE = (0.05, 0.5)
#: What a receiver does when a file's name is taken (README "serve").
OVERWRITE_POLICIES = ("replace", "rename", "skip", "fail")
#: Receiver: answers it holds back at most before sending them (group commit),
#: and directories it keeps open for them.
_HOLD_MAX = 64
_HOLD_DIRS = 8
_HOLD_PAUSE = 0.001
#: Receiver: bodies from this size on are hashed on a helper thread, in
#: pieces of _HASH_CHUNK (three such buffers per body: one being received,
#: one hashed, one spare).  Pieces larger than CHUNK hand over between the
#: threads a quarter as often, which is what a slow receiver (a Raspberry
#: Pi) spends its time on.
_HASH_BEHIND_MIN = 4 * CHUNK
_HASH_CHUNK = 4 * CHUNK
#: Sender: small writes (headers, small files, CHECKs) gathered into one send.
_GATHER = 64 * 1024
_IOV_MAX = 512          # buffers per sendmsg (Linux takes 1024, macOS 1024)
#: send -: most bytes of standard input kept in a temporary file to be sent.
STDIN_MAX = 10**9
#: Files a sender asks about in one CHECK write.
CHECK_BATCH = 128
#: Files a sender has asked about (CHECK) but not yet sent, per connection:
#: the answers for later files travel while earlier ones are being sent.
CHECK_AHEAD = 4 * CHECK_BATCH
#: send and send-dir: on Ctrl-C, seconds the workers get to end the
#: cancelled files, so the summary counts them (a stuck one is not waited for).
CANCEL_GRACE = 0.5
#: Names a watch never sends: what renderers and editors write under until
#: a file is complete (and then rename), and hidden names (the receiver's
#: own partial files start with a dot too).  README "Watching a folder".
WATCH_IGNORE = ("*.tmp", "*.part", "~*", ".~lock*", ".*")
#: Watch default: seconds a file's size and mtime must stay the same
#: before it counts as complete.
DEFAULT_SETTLE = 1.0
#: Watch default: seconds between looks.  A look stats each directory and
#: each file not yet sent, and lists only the directories that changed.
WATCH_INTERVAL = 0.5
#: Watch default: seconds between looks that stat every file, for a file
#: changed in place (its directory's mtime does not move when it is).
WATCH_RESCAN = 10.0
#: Watch: a directory modified this recently (seconds) is listed on every
#: look: where timestamps are coarse, a second change may not move its mtime.
_WATCH_RECENT = 2.0
#: Watch with inotify (Linux): seconds between looks that stat every file,
#: a safety net only: inotify reports changes in place as they happen.
WATCH_RESCAN_NOTIFIED = 60.0
#: Watch with inotify: a file a writer has open (modified, not yet closed)
#: is complete only once it is closed, or unchanged this many seconds.
WATCH_OPEN_MAX = 60.0
#: Watch: events kept for poll() at most; the oldest go first.
WATCH_EVENTS_MAX = 10000
#: Watch: complete files it keeps queued on the Sender at most; the rest wait
#: as pending, so a folder of a million files holds no more Jobs at once than
#: one of a few thousand.  While more are complete it tops the queue up every
#: WATCH_REFILL seconds, not only at each look.
WATCH_QUEUED_MAX = 2048
WATCH_REFILL = 0.05
#: HTTP (README "HTTP API"): the largest chunk of a chunked upload, and the
#: unit a partial kept across a restart is resumed from (the last whole one).
HTTP_CHUNK = 8 * 1024 * 1024
#: HTTP: the longest request line, and the most header bytes and lines after
#: it, checked as they arrive.
HTTP_LINE_MAX = 8 * 1024
HTTP_HEADERS_MAX = 32 * 1024
HTTP_HEADER_COUNT_MAX = 64
#: HTTP: the largest JSON request body (login, starting an upload).
HTTP_JSON_MAX = 64 * 1024
#: HTTP: a refused request's body up to this size is read and dropped, so the
#: connection goes on; a larger one is not read: the connection is closed.
HTTP_DRAIN_MAX = 64 * 1024
#: HTTP: seconds a login lasts (the session cookie's Max-Age), and the most
#: sessions kept (the oldest go first).
HTTP_SESSION_AGE = 12 * 3600
HTTP_SESSIONS_MAX = 1024
#: HTTP: chunked uploads held open at most, and seconds one may wait for its
#: next chunk before it is closed (its partial stays, to be resumed).
HTTP_UPLOADS_MAX = 64
HTTP_UPLOAD_IDLE = 3600.0

#------------------------------------------------------------
# errors and exit statuses
#------------------------------------------------------------

EXIT_OK = 0            # every file arrived and was verified
EXIT_FAILED = 1        # some files did not arrive (each is named on stderr)
EXIT_USAGE = 2         # bad command line or config file
EXIT_CONNECT = 3       # the server could not be reached
EXIT_AUTH = 4          # wrong or missing token
EXIT_PROTOCOL = 5      # the peer speaks another protocol or version
EXIT_INTERRUPTED = 130 # Ctrl-C

# Wire status codes (Protocol 4.4); _STATUSES below says what each means to a sender.
ST_OK, ST_SKIPPED, ST_NEEDED = 0, 1, 2
ST_BAD_PATH, ST_CONFLICT, ST_TOO_LARGE, ST_NO_SPACE = 10, 11, 12, 13
ST_INTEGRITY, ST_IO, ST_ABORTED, ST_DENIED = 14, 15, 16, 17
ST_PROTOCOL, ST_VERSION, ST_AUTH_REQUIRED, ST_AUTH_FAILED = 20, 21, 22, 23
ST_BUSY, ST_TIMEOUT, ST_SHUTDOWN, ST_TLS_REQUIRED = 24, 25, 26, 27


class XferError(Exception):
    """Base class for every error xfer raises on purpose.

    str(error) is the one line the command line prints; exit_code is the
    process status main() returns for it.
    """
    exit_code = EXIT_FAILED
    #: wire status code (Protocol 4.4) used when the receiver reports it
    code = ST_IO
    #: whether a fresh connection may succeed where this one failed
    transient = False


class ConfigError(XferError):
    """A setting is invalid: on the command line, in a config file or serverinfo.py."""
    exit_code = EXIT_USAGE

    def __init__(self, message, path=None, lineno=None, key=None):
        self.path, self.lineno, self.key = path, lineno, key
        where = ""
        if path is not None:
            where = str(path)
            if lineno is not None:
                where += ":%d" % lineno
            where += ": "
        if key is not None:
            where += "%s: " % key
        super().__init__(where + message)


class ConnectError(XferError, ConnectionError):
    """The server could not be reached."""
    exit_code = EXIT_CONNECT
    transient = True


class AuthError(XferError):
    """The token was wrong or missing, or a TLS certificate is not the pinned one."""
    exit_code = EXIT_AUTH
    code = ST_AUTH_FAILED
    #: False for a refusal that is not about the token (a changed
    #: certificate): no note of where the token came from is added to it
    of_token = True


class ProtocolError(XferError):
    """The peer sent something this version does not understand."""
    exit_code = EXIT_PROTOCOL
    code = ST_PROTOCOL


class VersionMismatchError(ProtocolError):
    """The peer speaks another protocol version."""
    code = ST_VERSION


class ConnectionClosedError(ProtocolError, ConnectionError):
    """The connection ended in the middle of a message."""
    exit_code = EXIT_FAILED
    transient = True


class RemoteError(XferError):
    """The receiver refused or failed one file or the whole connection.

    code is the wire status (Protocol 4.4); reason is the receiver's text;
    host, when set, is the receiver that said it, and str() starts with it.
    """

    def __init__(self, reason, code=ST_IO, host=None):
        self.code = code
        self.reason = reason
        self.host = host
        super().__init__(reason if host is None else "%s: %s" % (host, reason))

    @property
    def transient(self):
        return self.code in _TRANSIENT_CODES


class UnsafePathError(RemoteError):
    """A path would leave the destination or is not a safe name there."""

    def __init__(self, reason, path=None, code=ST_BAD_PATH, host=None):
        self.path = path
        if path:        # not "" either: "empty path" alone, not ": empty path"
            reason = "%s: %s" % (_display(path), reason)
        super().__init__(reason, code, host)


class IntegrityError(RemoteError):
    """The data received does not match its digest or MAC."""

    def __init__(self, reason, code=ST_INTEGRITY, host=None):
        super().__init__(reason, code, host)




class _Status(collections.namedtuple("_Status", "code name error transient http")):
    """One wire status: what a sender raises for it, whether a fresh
    connection may succeed where this one got it, and the HTTP status code
    an HTTP request refused (or answered) with it gets (README "HTTP API")."""

    @property
    def exit_code(self):
        return (self.error or RemoteError).exit_code


# The one table of wire statuses (Protocol 4.4, whose Code and Name columns a
# test compares with it).  error None: not an error (RemoteError if a peer
# sends it as one).  A code missing here, from a newer peer, is a RemoteError.
_STATUSES = tuple(_Status(*row) for row in (
    # code             name                error                 transient  HTTP
    (ST_OK,            "ST_OK",            None,                 False, 201),
    (ST_SKIPPED,       "ST_SKIPPED",       None,                 False, 200),
    (ST_NEEDED,        "ST_NEEDED",        None,                 False, 200),
    (ST_BAD_PATH,      "ST_BAD_PATH",      UnsafePathError,      False, 400),
    (ST_CONFLICT,      "ST_CONFLICT",      RemoteError,          False, 409),
    (ST_TOO_LARGE,     "ST_TOO_LARGE",     RemoteError,          False, 413),
    (ST_NO_SPACE,      "ST_NO_SPACE",      RemoteError,          False, 507),
    (ST_INTEGRITY,     "ST_INTEGRITY",     IntegrityError,       False, 422),
    (ST_IO,            "ST_IO",            RemoteError,          False, 500),
    (ST_ABORTED,       "ST_ABORTED",       RemoteError,          False, 409),
    (ST_DENIED,        "ST_DENIED",        RemoteError,          False, 403),
    (ST_PROTOCOL,      "ST_PROTOCOL",      ProtocolError,        False, 400),
    (ST_VERSION,       "ST_VERSION",       VersionMismatchError, False, 505),
    (ST_AUTH_REQUIRED, "ST_AUTH_REQUIRED", AuthError,            False, 401),
    (ST_AUTH_FAILED,   "ST_AUTH_FAILED",   AuthError,            False, 401),
    (ST_BUSY,          "ST_BUSY",          RemoteError,          True,  503),
    (ST_TIMEOUT,       "ST_TIMEOUT",       RemoteError,          True,  408),
    (ST_SHUTDOWN,      "ST_SHUTDOWN",      RemoteError,          True,  503),
    (ST_TLS_REQUIRED,  "ST_TLS_REQUIRED",  ProtocolError,        False, 403),
))
_STATUS_BY_CODE = {row.code: row for row in _STATUSES}
_TRANSIENT_CODES = frozenset(row.code for row in _STATUSES if row.transient)


def _error_for(code, reason, host=None):
    """Build the exception a sender raises for a receiver status (_STATUSES).

    host names the receiver in a file's refusal, so that it does not read
    like a local error (RESULT); connection-level errors go without it.
    """
    row = _STATUS_BY_CODE.get(code)
    cls = (row and row.error) or RemoteError
    if issubclass(cls, RemoteError):
        return cls(reason, code=code, host=host)
    err = cls(reason)
    err.code = code
    return err


#------------------------------------------------------------
# wire format (README "Protocol")
#------------------------------------------------------------
# Network byte order throughout.  Section numbers refer to README.md.

MAGIC = b"XFER"
PROTOCOL_VERSION = 2
_PREFACE = struct.Struct("!4sHH")      # magic, version, flags        (Protocol 2)
_FRAME = struct.Struct("!BI")          # kind, payload length          (Protocol 3)
_TAG_SIZE = 16                         # frame tag in a keyed session  (Protocol 3.1)
_C2S, _S2C = b"xfer c2s", b"xfer s2c"  # tag labels, one per direction (Protocol 3.1)
_NONCE_SIZE = 32                       # HELLO payload                 (Protocol 4.1)
_HANDSHAKE_FRAME_MAX = 64              # receiver's cap on frames before authentication
_FILE = struct.Struct("!IQqIB")        # id, size, mtime_ns, mode, flags; path follows (4.2)
_ACCEPT = struct.Struct("!IQ32s")      # id, offset, sha256 of the first offset bytes (4.3)
_BODY = struct.Struct("!IQ")           # id, start offset of the body  (4.3)
_CHECK = struct.Struct("!IQqB32s")     # id, size, mtime_ns, flags, sha256; path follows (4.8)
_TRAILER = struct.Struct("!IB32s")     # id, flags, sha256             (4.3)
_RESULT = struct.Struct("!IB")         # id, status; reason follows    (4.4)
_MKDIR = struct.Struct("!II")          # id, mode; path follows        (4.5)
_PONG = struct.Struct("!QQ")           # free bytes, total bytes; version text follows (4.6)
_ERROR = struct.Struct("!B")           # status; reason follows        (4.7)
_GET = struct.Struct("!IB")            # id, flags; path follows       (4.9)
_LIST = struct.Struct("!IB")           # id, flags; path follows       (4.10)
_ENTRY = struct.Struct("!BQqIH")       # type, size, mtime_ns, mode, name length (4.10)
_DONE = struct.Struct("!IB")           # id, status; reason follows    (4.9)
_BATCH = struct.Struct("!IH")          # first id, count; the entries follow (4.12)
_BATCH_ENTRY = struct.Struct("!QqIB32sH")  # size, mtime_ns, mode, flags, sha256, path length
_RESULTS = struct.Struct("!IH")        # first id, count; the entries follow (4.13)
_RESULTS_ENTRY = struct.Struct("!BH")  # status, reason length; the reason follows
_BARE_RESULTS_ENTRY = [_RESULTS_ENTRY.pack(status, 0) for status in range(256)]
_CHECKS = struct.Struct("!IHBH")       # first id, count, flags, directory length (4.14)
_CHECKS_ENTRY = struct.Struct("!QqH")  # size, mtime_ns, name length; sha256 (CF_CHECKSUM), name

# Flags.  Reserved bits are sent as 0, and a set one is refused on receipt
# (ST_PROTOCOL), so that a later version can give them a meaning.
# Preface flags (server to client; a client sends none).
PF_AUTH_REQUIRED = 0x0001
_PF_KNOWN = PF_AUTH_REQUIRED
# FILE flags.
FF_STREAM = 0x01       # the body follows the header at once, no ACCEPT
FF_DISCARD = 0x02      # verify the body, then throw it away (benchmarks)
_FF_KNOWN = FF_STREAM | FF_DISCARD
# BATCH entry flags: FILE's FF_DISCARD; FF_STREAM has no meaning there.
_BF_KNOWN = FF_DISCARD
# CHECK flags.
CF_CHECKSUM = 0x01     # compare content digests, not size and mtime
# TRAILER flags.
TF_ABORT = 0x01        # the sender gives this file up; discard it
# GET flags.
GF_CHECKSUM = 0x01     # the server sends each file's sha256 (a CHECK) before its FILE
# LIST flags.
LF_RECURSIVE = 0x01    # the whole tree below the path, not one directory
# LIST entry types.
ET_FILE, ET_DIR, ET_LINK, ET_OTHER = 0, 1, 2, 3


class _Msg:
    """Frame kinds (Protocol 3)."""
    HELLO = 0x01
    AUTH = 0x02
    AUTH_OK = 0x03
    PAIR = 0x04
    CONFIRM = 0x05
    PAIRED = 0x06
    FILE = 0x10
    ACCEPT = 0x11
    TRAILER = 0x12
    RESULT = 0x13
    MKDIR = 0x14
    CHECK = 0x15
    BODY = 0x16
    GET = 0x17
    LIST = 0x18
    ENTRIES = 0x19
    DONE = 0x1A
    BATCH = 0x1B
    RESULTS = 0x1C
    CHECKS = 0x1D
    PING = 0x20
    PONG = 0x21
    BYE = 0x22
    ERROR = 0x7F


_MSG_NAMES = {v: k for k, v in vars(_Msg).items() if k.isupper()}


def _msg_name(kind):
    return _MSG_NAMES.get(kind, "unknown message 0x%02x" % kind)


def _frame(kind, payload=b""):
    return _FRAME.pack(kind, len(payload)) + payload


def _untagged(frame):
    """A frame as an unkeyed session sends it: as it is (Protocol 3.1)."""
    return frame


class _Tags:
    """The tags of one direction of a keyed session (Protocol 3.1).

    Every frame after AUTH_OK is followed by the first 16 bytes of
    HMAC-SHA256(session key, label NUL sequence header payload), where the
    sequence counts that direction's frames from 0.  A frame altered,
    replayed, dropped, reordered or reflected fails its tag, and so does
    every later one.  The layer knows nothing of message kinds.

    HMAC (RFC 2104) is computed here from its two padded key states, made
    once, with the label already hashed into the inner one: per frame that
    saves the key set-up that hmac.digest() repeats on every call, half of
    its cost for a small frame.
    """
    __slots__ = ("_inner", "_outer", "seq", "_forged")

    def __init__(self, key, label, forged=None):
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key) + label + b"\0")
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self.seq = 0
        self._forged = forged    # seq -> the exception for a frame that fails its tag

    def tag(self, frame):
        """The tag of the next frame in this direction (header and payload)."""
        seq = self.seq
        self.seq = seq + 1
        inner = self._inner.copy()
        inner.update(seq.to_bytes(8, "big") + frame)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()[:_TAG_SIZE]

    def seal(self, frame):
        """frame followed by its tag."""
        return frame + self.tag(frame)

    def check(self, frame, tag):
        """Raise the forged() exception unless tag is the next frame's."""
        seq = self.seq
        if not hmac.compare_digest(self.tag(frame), tag):
            raise self._forged(seq)


def _session_tags(key, server, peer="the server"):
    """(incoming, outgoing) tags for one end of a session; (None, None) unkeyed."""
    if not key:
        return None, None
    if server:
        return _Tags(key, _C2S, lambda seq: ProtocolError(
            "frame %d from the client failed authentication (altered, replayed or "
            "reordered on the way)" % seq)), _Tags(key, _S2C)
    return _Tags(key, _S2C, lambda seq: IntegrityError(
        "the answer from %s failed authentication (frame %d altered, replayed or "
        "reordered on the way); the files it answers may not have arrived"
        % (peer, seq))), _Tags(key, _C2S)


def _recv_exact(rfile, n):
    """Read exactly n bytes from a buffered reader or raise ConnectionClosedError."""
    data = rfile.read(n)
    if len(data) != n:
        raise ConnectionClosedError(
            "connection closed after %d of %d bytes" % (len(data), n))
    return data


# poll() where there is one: select() refuses descriptors numbered past
# 1023, and a host application (TouchDesigner) easily has more open.
# Windows has no poll(), and its select() takes any socket.
_Selector = getattr(selectors, "PollSelector", selectors.SelectSelector)


class _Reader:
    """Buffered reads from a socket that can tell whether the next read waits.

    The receiver holds back its answers and syncs until its input runs dry
    (group commit); io.BufferedReader cannot say what it holds, this can.
    read() and readinto() behave like BufferedReader's.
    """

    def __init__(self, sock, size=CHUNK):
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.last = time.monotonic()    # when bytes last arrived
        self.selector = None            # made by the first ready() that must wait
        self.tags = None                # _Tags once the session is keyed

    def read(self, n):
        """n bytes; fewer only if the stream ends first."""
        if self.end - self.start < n:
            if n > len(self.buf):     # a frame larger than the buffer (Receiver max_frame)
                data = bytearray(self.read(len(self.buf)))
                while len(data) < n:
                    more = self.read(min(n - len(data), len(self.buf)))
                    if not more:
                        break
                    data += more
                return bytes(data)
            while self.end - self.start < n and self._fill(n):
                pass
            n = min(n, self.end - self.start)
        start = self.start
        self.start = start + n
        return bytes(self.view[start:start + n])

    def buffered(self, n):
        """The next n bytes as a view of the buffer if it holds them all (they
        count as read; the view is valid until the next read), else None."""
        start = self.start
        if self.end - start < n:
            return None
        self.start = start + n
        return self.view[start:start + n]

    def readinto(self, view):
        """Fill some of view; 0 at the end of the stream."""
        have = self.end - self.start
        if not have:
            if len(view) >= len(self.buf) // 4:
                n = self.sock.recv_into(view)       # a large body skips the copy
                if n:
                    self.last = time.monotonic()
                return n
            if not self._fill(1):
                return 0
            have = self.end - self.start
        n = min(have, len(view))
        view[:n] = self.view[self.start:self.start + n]
        self.start += n
        return n

    def _fill(self, want):
        """Receive more into the buffer; False if the stream ended."""
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf) or len(self.buf) - self.start < want:
            rest = bytes(self.view[self.start:self.end])      # move it to the front
            self.buf[:len(rest)] = rest
            self.start, self.end = 0, len(rest)
        n = self.sock.recv_into(self.view[self.end:])
        self.end += n
        if n:
            self.last = time.monotonic()
        return n > 0

    def frame(self, limit):
        """Read one frame: (kind, payload), like _read_frame, and check its tag
        in a keyed session.  Sliced at once from the buffer when it holds the
        whole frame."""
        got = self.buffered_frame(limit)
        if got is None:
            got = _read_frame(self, limit)
            if self.tags is not None:
                kind, payload = got
                self.tags.check(_FRAME.pack(kind, len(payload)) + payload,
                                _recv_exact(self, _TAG_SIZE))
        return got

    def buffered_frame(self, limit):
        """The next frame if the buffer holds all of it (and its tag), else None
        (reads nothing)."""
        start = self.start
        if self.end - start >= _FRAME.size:
            kind, length = _FRAME.unpack_from(self.buf, start)
            end = start + _FRAME.size + length
            tags = self.tags
            stop = end if tags is None else end + _TAG_SIZE
            if length <= limit and stop <= self.end:
                self.start = stop
                if tags is None:
                    return kind, bytes(self.view[start + _FRAME.size:end])
                frame = bytes(self.view[start:end])
                tags.check(frame, self.view[end:stop])
                return kind, frame[_FRAME.size:]
        return None

    def peek(self):
        """The next byte, not consumed (waits for it); None at the end of the stream."""
        if self.end == self.start and not self._fill(1):
            return None
        return self.buf[self.start]

    def at_end(self):
        """True if the stream ends before another byte (waits for one or the end)."""
        return self.end == self.start and not self._fill(1)

    def ready(self, timeout=0):
        """True if bytes are buffered, or arrive within timeout seconds."""
        if self.end > self.start:
            return True
        pending = getattr(self.sock, "pending", None)    # TLS: decrypted, not yet read
        if pending is not None and pending():
            return True
        if self.selector is None:
            self.selector = _Selector()
            self.selector.register(self.sock, selectors.EVENT_READ)
        return bool(self.selector.select(timeout))


def _read_preface(rfile):
    """Read the server's 8-byte preface; return its flags (Protocol 2)."""
    data = rfile.read(_PREFACE.size)
    if not data:
        raise ConnectionClosedError("connection closed before the preface")
    if not MAGIC.startswith(data[:len(MAGIC)]):
        if data[:1] == b"\x16":
            raise ProtocolError("the peer speaks TLS, not plain xfer")
        raise ProtocolError("the peer is not an xfer endpoint (bad magic %r)" % data[:4])
    if len(data) != _PREFACE.size:
        # What arrived is the start of a preface: the peer hung up, it did
        # not speak another protocol.
        raise ConnectionClosedError("connection closed inside the preface (%d of %d bytes)"
                                    % (len(data), _PREFACE.size))
    _, version, flags = _PREFACE.unpack(data)
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(_version_advice(version, "server"))
    if flags & ~_PF_KNOWN:
        raise ProtocolError("the server set reserved preface flags 0x%04x"
                            % (flags & ~_PF_KNOWN))
    return flags


def _version_advice(version, peer):
    """The message for a peer ("client" or "server") speaking another version."""
    if version < PROTOCOL_VERSION:
        where = "on the sending machine" if peer == "client" else "on the server"
    else:
        where = "on the receiving machine" if peer == "client" else "on this machine"
    return ("the %s speaks xfer protocol version %d, this xfer %s speaks version %d: "
            "upgrade xfer %s" % (peer, version, __version__, PROTOCOL_VERSION, where))


def _read_frame(rfile, limit=MAX_FRAME_PAYLOAD):
    """Read one frame; return (kind, payload).  The length is checked first."""
    kind, length = _FRAME.unpack(_recv_exact(rfile, _FRAME.size))
    if length > limit:
        raise ProtocolError("%s payload of %d bytes exceeds %d"
                            % (_msg_name(kind), length, limit))
    return kind, _recv_exact(rfile, length)


def _expect(rfile, kind, limit=MAX_FRAME_PAYLOAD):
    """Read one frame from a _Reader; return its payload if it is a kind."""
    got, payload = rfile.frame(limit)
    if got == _Msg.ERROR and kind != _Msg.ERROR:
        raise _decode_error(payload)
    if got != kind:
        raise ProtocolError("expected %s, got %s" % (_msg_name(kind), _msg_name(got)))
    return payload


def _encode_file(fid, size, mtime_ns, mode, flags, path):
    """A FILE frame; path is text or its UTF-8 bytes."""
    if not isinstance(path, bytes):
        path = path.encode("utf-8")
    return _frame(_Msg.FILE, _FILE.pack(fid, size, mtime_ns, mode, flags) + path)


def _decode_file(payload):
    if len(payload) < _FILE.size:
        raise ProtocolError("FILE payload of %d bytes is too short" % len(payload))
    fid, size, mtime_ns, mode, flags = _FILE.unpack_from(payload)
    if flags & ~_FF_KNOWN:
        raise ProtocolError("FILE %d sets reserved flags 0x%02x" % (fid, flags & ~_FF_KNOWN))
    if flags & FF_STREAM and size > STREAM_MAX:
        # Refused before its body arrives: a streamed body cannot be refused
        # without reading it all (Protocol 4.2).
        raise ProtocolError("FILE %d streams %d bytes, over STREAM_MAX (%d)"
                            % (fid, size, STREAM_MAX))
    return fid, size, mtime_ns, mode, flags, payload[_FILE.size:]


def _encode_trailer(fid, flags, digest):
    return _frame(_Msg.TRAILER, _TRAILER.pack(fid, flags, digest))


def _decode_trailer(payload):
    if len(payload) != _TRAILER.size:
        raise ProtocolError("TRAILER payload of %d bytes" % len(payload))
    fid, flags, digest = _TRAILER.unpack(payload)
    if flags & ~TF_ABORT:
        raise ProtocolError("TRAILER %d sets reserved flags 0x%02x" % (fid, flags & ~TF_ABORT))
    return fid, flags, digest


def _read_body_start(rfile, fid, offset):
    """BODY (Protocol 4.3): where the sender starts, 0 or the offered offset."""
    payload = _expect(rfile, _Msg.BODY)
    if len(payload) != _BODY.size:
        raise ProtocolError("BODY payload of %d bytes" % len(payload))
    bid, start = _BODY.unpack(payload)
    if bid != fid or start not in (0, offset):
        raise ProtocolError("BODY for file %d at %d; expected file %d at 0 or %d"
                            % (bid, start, fid, offset))
    return start


def _read_trailer(rfile, fid):
    """TRAILER (Protocol 4.3): (flags, sha256).  Its tag binds it to its FILE."""
    kind, payload = rfile.frame(MAX_FRAME_PAYLOAD)
    if kind != _Msg.TRAILER:
        raise ProtocolError("expected TRAILER, got %s" % _msg_name(kind))
    tid, flags, digest = _decode_trailer(payload)
    if tid != fid:
        raise ProtocolError("TRAILER for file %d while receiving file %d" % (tid, fid))
    return flags, digest


def _decode_check(payload):
    if len(payload) < _CHECK.size:
        raise ProtocolError("CHECK payload of %d bytes is too short" % len(payload))
    fid, size, mtime_ns, flags, digest = _CHECK.unpack_from(payload)
    if flags & ~CF_CHECKSUM:
        raise ProtocolError("CHECK %d sets reserved flags 0x%02x" % (fid, flags & ~CF_CHECKSUM))
    return fid, size, mtime_ns, flags, digest, payload[_CHECK.size:]


def _encode_result(fid, status, reason=""):
    return _frame(_Msg.RESULT, _RESULT.pack(fid, status)
                  + reason.encode("utf-8", "replace")[:4000])


def _decode_result(payload):
    if len(payload) < _RESULT.size:
        raise ProtocolError("RESULT payload of %d bytes is too short" % len(payload))
    fid, status = _RESULT.unpack_from(payload)
    return fid, status, payload[_RESULT.size:].decode("utf-8", "replace")


def _encode_error(status, reason):
    return _frame(_Msg.ERROR, _ERROR.pack(status) + reason.encode("utf-8", "replace")[:4000])


def _decode_error(payload):
    """Turn an ERROR payload into the exception to raise."""
    if len(payload) < _ERROR.size:
        return ProtocolError("ERROR payload is empty")
    (status,) = _ERROR.unpack_from(payload)
    return _error_for(status, payload[_ERROR.size:].decode("utf-8", "replace"))


# Many small files per frame and per answer (Protocol 4.12-4.14).  A BATCH
# lists the headers of up to BATCH_FILES files, ids first, first + 1, ...,
# and their bodies follow it as raw bytes; one tag covers every header and
# digest.  A run of answers travels as one RESULTS; a CHECKS asks about many
# files of one directory.  None of them says which end sends it: a server
# serving a pull can send BATCH too.

def _batch_entry(size, mtime_ns, mode, flags, digest, path):
    """One file's entry in a BATCH; path is its UTF-8 bytes."""
    return _BATCH_ENTRY.pack(size, mtime_ns, mode, flags, digest, len(path)) + path


def _encode_batch(first, entries):
    """A BATCH frame for the files of entries (_batch_entry), ids from first."""
    return _frame(_Msg.BATCH, _BATCH.pack(first, len(entries)) + b"".join(entries))


def _decode_batch(payload):
    """BATCH: (first id, [(size, mtime_ns, mode, flags, sha256, path)]).

    Every limit is checked here, before a byte of any body is read: the
    count, each size and their sum (Protocol 5)."""
    if len(payload) < _BATCH.size:
        raise ProtocolError("BATCH payload of %d bytes is too short" % len(payload))
    first, count = _BATCH.unpack_from(payload)
    if not 0 < count <= BATCH_FILES or first + count > 1 << 32:
        raise ProtocolError("BATCH %d of %d files; 1 to %d allowed"
                            % (first, count, BATCH_FILES))
    unpack, fixed, end = _BATCH_ENTRY.unpack_from, _BATCH_ENTRY.size, len(payload)
    offset, total, entries = _BATCH.size, 0, []
    for _ in range(count):
        if offset + fixed > end:
            raise ProtocolError("BATCH %d ends inside its entries" % first)
        size, mtime_ns, mode, flags, digest, length = unpack(payload, offset)
        offset += fixed + length
        if offset > end:
            raise ProtocolError("BATCH %d ends inside a path" % first)
        if flags & ~_BF_KNOWN:
            raise ProtocolError("BATCH %d sets reserved flags 0x%02x" % (first, flags & ~_BF_KNOWN))
        if size > SMALL_MAX:
            raise ProtocolError("BATCH %d holds a file of %d bytes, over SMALL_MAX (%d)"
                                % (first, size, SMALL_MAX))
        total += size
        entries.append((size, mtime_ns, mode, flags, digest, payload[offset - length:offset]))
    if offset != end:
        raise ProtocolError("BATCH %d has %d bytes after its entries" % (first, end - offset))
    if total > BATCH_BYTES:
        raise ProtocolError("BATCH %d carries %d bytes, over BATCH_BYTES (%d)"
                            % (first, total, BATCH_BYTES))
    return first, entries


def _encode_results(first, verdicts):
    """RESULTS frames answering ids first, first + 1, ... with a (status,
    reason) each: one frame, or as many as MAX_FRAME_PAYLOAD needs."""
    frames, parts, size = [], [], _RESULTS.size
    last, entry = None, None     # the last entry made, for a run of equal ones ("identical")
    for verdict in verdicts:
        status, reason = verdict
        if not reason and size + _RESULTS_ENTRY.size <= MAX_FRAME_PAYLOAD:
            parts.append(_BARE_RESULTS_ENTRY[status])
            size += _RESULTS_ENTRY.size
            continue
        if verdict != last:
            text = reason.encode("utf-8", "replace")[:4000] if reason else b""
            last, entry = verdict, _RESULTS_ENTRY.pack(status, len(text)) + text
        if size + len(entry) > MAX_FRAME_PAYLOAD:
            frames.append(_frame(_Msg.RESULTS, _RESULTS.pack(first, len(parts))
                                 + b"".join(parts)))
            first += len(parts)
            parts, size = [], _RESULTS.size
        parts.append(entry)
        size += len(entry)
    frames.append(_frame(_Msg.RESULTS, _RESULTS.pack(first, len(parts)) + b"".join(parts)))
    return frames


def _decode_results(payload):
    """RESULTS: (first id, [(status, reason)])."""
    if len(payload) < _RESULTS.size:
        raise ProtocolError("RESULTS payload of %d bytes is too short" % len(payload))
    first, count = _RESULTS.unpack_from(payload)
    unpack, fixed, end = _RESULTS_ENTRY.unpack_from, _RESULTS_ENTRY.size, len(payload)
    offset, verdicts = _RESULTS.size, []
    if end - offset == count * fixed:
        # No entry has a reason (the usual answer): all of them at once.
        verdicts = [(status, "") for status, length in
                    _RESULTS_ENTRY.iter_unpack(memoryview(payload)[offset:]) if not length]
        if len(verdicts) != count:
            raise ProtocolError("RESULTS %d ends inside a reason" % first)
        return first, verdicts
    if end - offset > count * fixed and count and (end - offset) % count == 0:
        # Every entry the same (the files of a tree sent again: "identical"):
        # one decoded for all.
        one = payload[offset:offset + (end - offset) // count]
        status, length = unpack(one, 0)
        if fixed + length == len(one) and payload[offset:] == one * count:
            return first, [(status, one[fixed:].decode("utf-8", "replace"))] * count
    for _ in range(count):
        if offset + fixed > end:
            raise ProtocolError("RESULTS %d ends inside its entries" % first)
        status, length = unpack(payload, offset)
        offset += fixed + length
        if offset > end:
            raise ProtocolError("RESULTS %d ends inside a reason" % first)
        verdicts.append((status, payload[offset - length:offset].decode("utf-8", "replace")))
    if offset != end:
        raise ProtocolError("RESULTS %d has %d bytes after its entries" % (first, end - offset))
    return first, verdicts


def _checks_entry(size, mtime_ns, name, digest=None):
    """One file's entry in a CHECKS; name is its UTF-8 bytes, digest given
    with CF_CHECKSUM."""
    return _CHECKS_ENTRY.pack(size, mtime_ns, len(name)) + (digest or b"") + name


def _encode_checks(first, flags, directory, entries):
    """A CHECKS frame about the files of one directory (_checks_entry)."""
    return _frame(_Msg.CHECKS, _CHECKS.pack(first, len(entries), flags, len(directory))
                  + directory + b"".join(entries))


def _decode_checks(payload):
    """CHECKS: (first id, directory, [(size, mtime_ns, sha256 or None, name)])."""
    if len(payload) < _CHECKS.size:
        raise ProtocolError("CHECKS payload of %d bytes is too short" % len(payload))
    first, count, flags, length = _CHECKS.unpack_from(payload)
    if flags & ~CF_CHECKSUM:
        raise ProtocolError("CHECKS %d sets reserved flags 0x%02x" % (first, flags & ~CF_CHECKSUM))
    if not 0 < count <= BATCH_FILES or first + count > 1 << 32:
        raise ProtocolError("CHECKS %d of %d files; 1 to %d allowed"
                            % (first, count, BATCH_FILES))
    digest_size = 32 if flags & CF_CHECKSUM else 0
    unpack, fixed, end = _CHECKS_ENTRY.unpack_from, _CHECKS_ENTRY.size, len(payload)
    offset = _CHECKS.size + length
    directory = payload[_CHECKS.size:offset]
    entries = []
    for _ in range(count):
        if offset + fixed > end:
            raise ProtocolError("CHECKS %d ends inside its entries" % first)
        size, mtime_ns, length = unpack(payload, offset)
        offset += fixed + digest_size + length
        if offset > end:
            raise ProtocolError("CHECKS %d ends inside a name" % first)
        digest = payload[offset - length - digest_size:offset - length] if digest_size else None
        entries.append((size, mtime_ns, digest, payload[offset - length:offset]))
    if offset != end:
        raise ProtocolError("CHECKS %d has %d bytes after its entries" % (first, end - offset))
    return first, directory, entries


#------------------------------------------------------------
# authentication (Protocol 4.1)
#------------------------------------------------------------

def _transcript(client_preface, client_nonce, server_preface, server_nonce):
    return client_preface + client_nonce + server_preface + server_nonce


def _auth_mac(token, label, transcript):
    return hmac.new(token.encode("utf-8"), label + b"\0" + transcript,
                    hashlib.sha256).digest()


def _client_handshake(sock, rfile, token, require_server_auth=False, peer="the server"):
    """Run the client side of the handshake on a _Reader.

    Returns the outgoing _Tags (None without auth) and leaves the incoming
    ones on rfile: from here on every frame is tagged (Protocol 3.1).
    """
    key = _client_keys(sock, rfile, token, require_server_auth)
    rfile.tags, outgoing = _session_tags(key, server=False, peer=peer)
    return outgoing


def _client_hello(sock, rfile):
    """Send the client's preface and HELLO, read the server's (Protocol 4.1);
    return (server flags, transcript)."""
    client_preface = _PREFACE.pack(MAGIC, PROTOCOL_VERSION, 0)
    client_nonce = secrets.token_bytes(_NONCE_SIZE)
    sock.sendall(client_preface + _frame(_Msg.HELLO, client_nonce))
    flags = _read_preface(rfile)
    server_preface = _PREFACE.pack(MAGIC, PROTOCOL_VERSION, flags)
    kind, payload = rfile.frame(MAX_FRAME_PAYLOAD)
    if kind == _Msg.ERROR:
        raise _decode_error(payload)
    if kind != _Msg.HELLO or len(payload) != _NONCE_SIZE:
        raise ProtocolError("expected HELLO, got %s" % _msg_name(kind))
    server_nonce = payload
    transcript = _transcript(client_preface, client_nonce, server_preface, server_nonce)
    return flags, transcript


def _client_keys(sock, rfile, token, require_server_auth):
    """The client's handshake messages (Protocol 4.1); the session key, b"" without auth."""
    flags, transcript = _client_hello(sock, rfile)
    if flags & PF_AUTH_REQUIRED:
        if not token:
            raise AuthError("this server requires a token: pass --token, set XFER_TOKEN "
                            "or add token = ... to the host's config section")
        sock.sendall(_frame(_Msg.AUTH, _auth_mac(token, b"xfer client", transcript)))
        proof = _expect(rfile, _Msg.AUTH_OK)
        if not hmac.compare_digest(proof, _auth_mac(token, b"xfer server", transcript)):
            raise AuthError("the server could not prove it knows the token")
        return _auth_mac(token, b"xfer session", transcript)
    if token and require_server_auth:
        raise AuthError("the server does not ask for a token although one is set for it; "
                        "refusing to send, in case it is an impostor (it may also run with "
                        "--no-auth: then send without a token)")
    sock.sendall(_frame(_Msg.AUTH, b""))
    _expect(rfile, _Msg.AUTH_OK)
    return b""


def cert_fingerprint(der):
    """SHA-256 fingerprint of a DER certificate, as colon-separated hex pairs."""
    digest = hashlib.sha256(der).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _same_fingerprint(a, b):
    norm = lambda fp: fp.replace(":", "").replace(" ", "").strip().lower()
    return hmac.compare_digest(norm(a), norm(b))


def _check_fingerprint(text):
    """A pinned fingerprint as cert_fingerprint() writes it; ValueError if malformed.

    Checked where it is given, so a typo is not reported later as a changed
    certificate."""
    digits = text.replace(":", "").replace(" ", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("not a SHA-256 fingerprint: %r (64 hex digits, colons allowed, as "
                         "the server's banner prints it)" % text)
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2))


def _server_tls_context(cert, key):
    """An ssl.SSLContext serving cert/key, TLS 1.2 or newer."""
    _require_ssl()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        # For a file without its part OpenSSL says only "[SSL] PEM lib (_ssl.c:3926)".
        if isinstance(e, ssl.SSLError) and not _pem_holds(cert, b"CERTIFICATE-----"):
            raise ConfigError("cannot load the TLS certificate %s: it holds no PEM "
                              "certificate" % cert) from None
        if isinstance(e, ssl.SSLError) and not _pem_holds(key, b"PRIVATE KEY-----"):
            raise ConfigError("cannot load the TLS certificate %s: %s holds no PEM private "
                              "key%s" % (cert, key, "; give the key with --tls-key"
                                         if key == cert else "")) from None
        raise ConfigError("cannot load the TLS certificate %s / key %s: %s"
                          % (cert, key, getattr(e, "strerror", None) or e)) from None
    return ctx


def _pem_holds(path, marker):
    """Whether the PEM file at path has a block ending in marker."""
    try:
        with open(path, "rb") as f:
            return marker in f.read(1 << 20)
    except OSError:
        return True         # not the trouble: load_cert_chain's error says what is


def _certificate_der(cert):
    """DER bytes of the first certificate in a PEM file."""
    with open(cert, encoding="ascii", errors="replace") as f:
        pem = f.read()
    begin = pem.find("-----BEGIN CERTIFICATE-----")
    end = pem.find("-----END CERTIFICATE-----", begin)
    if begin < 0 or end < 0:
        raise ConfigError("no PEM certificate found", cert)
    return ssl.PEM_cert_to_DER_cert(pem[begin:end + len("-----END CERTIFICATE-----")])


def _client_tls(sock, host, port, fingerprint, known_hosts):
    """Wrap sock in TLS and check the server certificate against its pin.

    The pin is fingerprint if given, else the line for HOST:PORT in the
    known_hosts file; with neither, the certificate is trusted on first
    use and recorded there (like ssh).  Without fingerprint and
    known_hosts the channel is encrypted but the server is not pinned.
    Returns (ssl socket, fingerprint seen, newly trusted?).
    """
    _require_ssl()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE    # the pin below replaces CA trust on a LAN
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    tls = ctx.wrap_socket(sock, do_handshake_on_connect=False)
    hostport = _host_port_text(host, port)
    try:
        tls.do_handshake()
    except ssl.SSLError as e:
        # A busy server refuses before TLS starts, in plain xfer (Protocol 2).
        refusal = _plain_refusal(tls)
        if refusal is not None:
            raise refusal from None
        tls.close()
        raise ProtocolError("TLS handshake with %s failed (%s); is the server started "
                            "with --tls?" % (hostport, e.reason or e)) from None
    except OSError:
        tls.close()
        raise ProtocolError("%s closed the connection during the TLS handshake; is the "
                            "server started with --tls?" % hostport) from None
    seen = cert_fingerprint(tls.getpeercert(binary_form=True))
    expected = fingerprint
    advice = "check it against the fingerprint in the server's startup banner"
    if expected is None and known_hosts:
        try:
            expected = _known_fingerprint(known_hosts, hostport)
        except ConfigError:
            tls.close()
            raise
        advice = "remove the line for %s from %s and send again" % (hostport, known_hosts)
    if expected is None:
        if known_hosts:
            try:
                _remember_fingerprint(known_hosts, hostport, seen)
            except OSError as e:        # not the server's fault: no retry
                tls.close()
                raise ConfigError("cannot record the server's certificate: %s"
                                  % (e.strerror or e), known_hosts) from None
        return tls, seen, True
    if not _same_fingerprint(expected, seen):
        tls.close()
        error = AuthError(
            "WARNING: the TLS certificate of %s has changed: expected %s, got %s. Someone "
            "may be intercepting the connection, or the server got a new certificate; if "
            "you expected that, %s" % (hostport, expected, seen, advice))
        error.of_token = False
        raise error
    return tls, seen, False


def _plain_refusal(tls):
    """After a failed TLS handshake: the plain xfer ERROR the server sent, or None."""
    try:
        raw = socket.socket(fileno=tls.detach())
    except OSError:
        return None
    rest = b""
    try:
        raw.settimeout(1.0)
        while len(rest) < 8192:
            data = raw.recv(8192)
            if not data:
                break
            rest += data
    except OSError:
        pass
    finally:
        raw.close()
    # OpenSSL has consumed up to one record header (5 bytes) of the preface.
    for i in range(_PREFACE.size):
        if len(rest) - i >= _FRAME.size and rest[i] == _Msg.ERROR:
            _, length = _FRAME.unpack_from(rest, i)
            if length == len(rest) - i - _FRAME.size:
                return _decode_error(rest[i + _FRAME.size:])
    return None


def _host_port_text(host, port):
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _known_fingerprint(path, hostport):
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == hostport:
                    return fields[1]
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(e.strerror or str(e), path) from None
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path) from None
    return None


def _remember_fingerprint(path, hostport, fingerprint):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # 0600 like the config beside it: the list says which machines this user sends to.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write("%s %s\n" % (hostport, fingerprint))


#------------------------------------------------------------
# pairing (PAKE; Protocol 4.11)
#------------------------------------------------------------
# SPAKE2 (RFC 9382) over P-256 with SHA-256, HKDF-SHA256 and HMAC-SHA256,
# the RFC's suite "P256-SHA256-HKDF-HMAC", in pure Python.  The client is
# the RFC's A, the server its B.  Python's integers do not run in constant
# time, so the scalar multiplications may leak timing; the secrets they use
# (x, y) live for one pairing, and every comparison of a MAC uses
# hmac.compare_digest.

_P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_P256_G = (0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296,
           0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5)
# RFC 9382 section 6: M and N for P-256, in SEC1 compressed form.
_SPAKE2_M = bytes.fromhex("02886e2f97ace46e55ba9dd7242579f2993b64e16ef3dcab95afd497333d8fa12f")
_SPAKE2_N = bytes.fromhex("03d8bbd6c639c62937b04d997f38c3770719c629d7014d49a24b4f98baa1292b49")


def _p256_on_curve(point):
    x, y = point
    p = _P256_P
    return 0 <= x < p and 0 <= y < p and (y * y - (x * x * x - 3 * x + _P256_B)) % p == 0


def _p256_decode(data):
    """A point from its SEC1 encoding (compressed or not); ValueError if it is
    not on the curve.  The identity has no encoding here, and P-256's
    cofactor is 1: every point on the curve is in the group."""
    p = _P256_P
    if len(data) == 33 and data[0] in (2, 3):
        x = int.from_bytes(data[1:], "big")
        if x >= p:
            raise ValueError("point coordinate out of range")
        y = pow((x * x * x - 3 * x + _P256_B) % p, (p + 1) // 4, p)   # p = 3 mod 4
        if (y * y - (x * x * x - 3 * x + _P256_B)) % p:
            raise ValueError("not a point on P-256")
        if y & 1 != data[0] & 1:
            y = p - y
        return x, y
    if len(data) == 65 and data[0] == 4:
        point = int.from_bytes(data[1:33], "big"), int.from_bytes(data[33:], "big")
        if not _p256_on_curve(point):
            raise ValueError("not a point on P-256")
        return point
    raise ValueError("not a SEC1 point encoding (%d bytes)" % len(data))


def _p256_encode(point, compressed=False):
    x, y = point
    if compressed:
        return bytes([2 + (y & 1)]) + x.to_bytes(32, "big")
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


# Points in Jacobian coordinates (X, Y, Z), affine (X/Z^2, Y/Z^3); Z = 0 is
# the identity.  a = -3 on P-256.

def _jac_double(pt):
    x, y, z = pt
    p = _P256_P
    if not y or not z:
        return (1, 1, 0)
    zz = z * z % p
    m = 3 * (x - zz) * (x + zz) % p
    yy = y * y % p
    s = 4 * x * yy % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _jac_add(a, b):
    if not a[2]:
        return b
    if not b[2]:
        return a
    p = _P256_P
    x1, y1, z1 = a
    x2, y2, z2 = b
    z1z1, z2z2 = z1 * z1 % p, z2 * z2 % p
    u1, u2 = x1 * z2z2 % p, x2 * z1z1 % p
    s1, s2 = y1 * z2 * z2z2 % p, y2 * z1 * z1z1 % p
    h, r = (u2 - u1) % p, (s2 - s1) % p
    if not h:
        return _jac_double(a) if not r else (1, 1, 0)
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - s1 * hhh) % p, z1 * z2 * h % p


def _p256_mul(k, point):
    """k * point (affine in, Jacobian out), k reduced mod the group order.

    Four bits at a time from a table of 0..15 times point: 256 doublings
    and at most 64 additions."""
    k %= _P256_N
    table = [(1, 1, 0), (point[0], point[1], 1)]
    for _ in range(14):
        table.append(_jac_add(table[-1], table[1]))
    acc = (1, 1, 0)
    for shift in range(252, -4, -4):
        for _ in range(4):
            acc = _jac_double(acc)
        digit = (k >> shift) & 15
        if digit:
            acc = _jac_add(acc, table[digit])
    return acc


def _p256_affine(pt):
    """Affine (x, y) of a Jacobian point; None for the identity."""
    x, y, z = pt
    if not z:
        return None
    p = _P256_P
    zi = pow(z, -1, p)
    zi2 = zi * zi % p
    return x * zi2 % p, y * zi2 * zi % p


def _jac_neg(pt):
    return pt[0], (-pt[1]) % _P256_P, pt[2]


def _hkdf_sha256(ikm, info, length, salt=b""):
    """HKDF (RFC 5869) with SHA-256."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def _spake2_share(w, secret, client):
    """pA = x*G + w*M (client, RFC 9382's A) or pB = y*G + w*N (server, B); affine."""
    mask = _p256_decode(_SPAKE2_M if client else _SPAKE2_N)
    return _p256_affine(_jac_add(_p256_mul(secret, _P256_G), _p256_mul(w, mask)))


def _spake2_key(w, secret, peer_share, client):
    """K = x*(pB - w*N) (client) or y*(pA - w*M) (server); ValueError if it is
    the identity, which only a share built to cancel the mask gives."""
    mask = _p256_decode(_SPAKE2_N if client else _SPAKE2_M)
    unmasked = _jac_add((peer_share[0], peer_share[1], 1), _jac_neg(_p256_mul(w, mask)))
    key = _p256_affine(_p256_mul(secret, _p256_affine(unmasked) or (0, 0))) \
        if unmasked[2] else None
    if key is None:
        raise ValueError("the peer's share gives the identity")
    return key


def _spake2_schedule(id_a, id_b, pa, pb, k, w, aad=b""):
    """RFC 9382 section 4: (Ke, cA, cB) from the transcript TT.

    TT = len(A) A len(B) B len(pA) pA len(pB) pB len(K) K len(w) w, each
    length 8 bytes little-endian, points uncompressed, w big-endian in 32
    bytes.  Hash(TT) = Ke || Ka; KcA || KcB = HKDF(Ka, "ConfirmationKeys" ||
    AAD); cA = HMAC(KcA, TT), cB = HMAC(KcB, TT).
    """
    tt = b""
    for part in (id_a, id_b, _p256_encode(pa), _p256_encode(pb), _p256_encode(k),
                 w.to_bytes(32, "big")):
        tt += len(part).to_bytes(8, "little") + part
    digest = hashlib.sha256(tt).digest()
    ke, ka = digest[:16], digest[16:]
    kc = _hkdf_sha256(ka, b"ConfirmationKeys" + aad, 32)
    return (ke, hmac.new(kc[:16], tt, hashlib.sha256).digest(),
            hmac.new(kc[16:], tt, hashlib.sha256).digest())


_CODE_WORDS = tuple("""
    acorn amber anchor apple apron arrow aspen atlas autumn badge bagel bamboo banjo barley
    basket beach beacon beaver bench berry bicycle birch biscuit bison blanket bloom boat
    bottle branch bread breeze brick bridge brook bucket butter button cabin cactus camel
    candle canoe canyon carpet carrot castle cedar cello chalk cherry chess cider circle cliff
    clock cloud clover cobalt cocoa coffee comet compass copper coral cotton cradle crayon
    cricket crystal cubby daisy dance delta desert diamond dinner dolphin donkey dragon dream
    drum dune eagle echo elbow ember engine falcon feather fender fern fiddle field fig finch
    flame flute forest fossil fox frost garden garlic gecko ginger glacier globe goose grape
    gravel guitar hammer harbor harvest hazel heron hickory honey horizon igloo island ivory
    jacket jasmine jelly jigsaw jungle kayak kettle kitten ladder lagoon lantern lemon lilac
    lily linen lizard lobster locket lotus magnet mango maple marble meadow melon meteor mint
    mirror mitten monkey moose mosaic motor muffin mustard napkin nectar needle nickel noodle
    nutmeg oak oasis ocean olive onion orange orbit orchid otter owl oyster paddle panda paper
    parrot peach peanut pebble pencil pepper piano pickle pillow pine planet plum pocket pony
    poppy potato pretzel puzzle quartz quill rabbit radish rain raven ribbon river robin rocket
    saddle salmon sandal saturn scarf shadow shell silver sketch sleigh snow socket spoon
    spruce squash star stone sugar summer sunset swan table tango teapot thimble thunder tiger
    timber toast tomato topaz tractor tulip tunnel turtle umbrella valley velvet violet violin
    wagon walnut walrus whale willow window winter wizard yogurt zebra zipper
""".split())
#: A pairing code is open for this many seconds, for this many tries (the
#: one that succeeds uses it up); then serve shows a new one on request.
PAIRING_LIFETIME = 600.0
PAIRING_TRIES = 3
_CODE_NUMBERS = 99                     # the code's number: 1 to 99
_CODE_KDF_ROUNDS = 10000               # PBKDF2-HMAC-SHA256 rounds, code -> w (Protocol 4.11)
_CODE_KDF_SALT = b"xfer pairing code"
_SPAKE2_A, _SPAKE2_B = b"xfer client", b"xfer server"   # RFC 9382 identities
_SHARE_SIZE = 33                       # a compressed P-256 point
_CONFIRM_SIZE = 32


def _new_code():
    """A random pairing code: a number and two words, e.g. "7-castle-river"
    (99 * 256 * 256 codes, 22.6 bits)."""
    words = [_CODE_WORDS[secrets.randbelow(len(_CODE_WORDS))] for _ in range(2)]
    return "-".join([str(1 + secrets.randbelow(_CODE_NUMBERS))] + words)


def _ascii_digits(text):
    """True if text is one or more of 0-9: str.isdigit() alone takes "\u00b2" too,
    which int() refuses."""
    return text.isascii() and text.isdigit()


def _normalize_code(text):
    """The canonical form of a typed code (case, spaces and dashes forgiven);
    ConfigError, naming the part, if it cannot be one."""
    parts = [p for p in re.split(r"[\s\-_.]+", text.strip().lower()) if p]
    problem = None
    if len(parts) != 3 or not _ascii_digits(parts[0]):
        problem = "a pairing code is a number and two words, like 7-castle-river"
    elif not 1 <= int(parts[0]) <= _CODE_NUMBERS:
        problem = "its number is from 1 to %d" % _CODE_NUMBERS
    else:
        unknown = [p for p in parts[1:] if p not in _CODE_WORDS]
        if unknown:
            problem = "%r is not one of the words serve uses; check the spelling" % unknown[0]
    if problem:
        raise ConfigError("not a pairing code: %r: %s" % (text, problem))
    return "%d-%s-%s" % (int(parts[0]), parts[1], parts[2])


def _code_scalar(code):
    """w = PBKDF2-HMAC-SHA256(code, salt, rounds, 40 bytes) mod the group order
    (RFC 9382 section 3.2: 64 bits more than the order, so the bias is tiny)."""
    stretched = hashlib.pbkdf2_hmac("sha256", code.encode("utf-8"), _CODE_KDF_SALT,
                                    _CODE_KDF_ROUNDS, 40)
    return int.from_bytes(stretched, "big") % _P256_N


def _pairing_keys(ke):
    """(cipher key, MAC key) for the PAIRED secret, from SPAKE2's Ke."""
    return (_hkdf_sha256(ke, b"xfer pairing cipher", 32),
            _hkdf_sha256(ke, b"xfer pairing mac", 32))


def _keystream(key, length):
    """HMAC-SHA256(key, block number "!Q") for blocks 0, 1, ...: length bytes."""
    return b"".join(hmac.new(key, struct.pack("!Q", i), hashlib.sha256).digest()
                    for i in range(-(-length // 32)))[:length]


def _seal(ke, plaintext):
    """Encrypt-then-MAC under a key used for this one message (Protocol 4.11)."""
    cipher_key, mac_key = _pairing_keys(ke)
    body = bytes(a ^ b for a, b in zip(plaintext, _keystream(cipher_key, len(plaintext))))
    return body + hmac.new(mac_key, body, hashlib.sha256).digest()


def _unseal(ke, sealed):
    cipher_key, mac_key = _pairing_keys(ke)
    body, mac = sealed[:-32], sealed[-32:]
    if len(sealed) < 32 or not hmac.compare_digest(
            mac, hmac.new(mac_key, body, hashlib.sha256).digest()):
        raise IntegrityError("the server's pairing answer failed authentication (altered "
                             "on the way)")
    return bytes(a ^ b for a, b in zip(body, _keystream(cipher_key, len(body))))


class _PairingCode:
    """A receiver's one open pairing code: its lifetime, its tries, one use.

    A try is counted when a PAIR arrives, before the server answers it, so
    parallel guesses count too; the try whose confirmation is right uses the
    code up.  clock is the seam for tests of the lifetime.
    """

    def __init__(self, log=None, clock=time.monotonic):
        self.log = log or (lambda line: None)
        self.clock = clock
        self.lock = threading.Lock()
        self.code = self.w = None
        self.expires = 0.0
        self.lifetime = PAIRING_LIFETIME
        self.tries = 0
        self.serial = 0             # which code a try belongs to
        self.ended = None           # why the last code ended, once logged

    def open(self, code=None, lifetime=PAIRING_LIFETIME, tries=PAIRING_TRIES):
        code = _normalize_code(code) if code else _new_code()
        w = _code_scalar(code)
        with self.lock:
            self.code, self.w = code, w
            self.expires = self.clock() + lifetime
            self.lifetime = lifetime
            self.tries = tries
            self.serial += 1
            self.ended = None
        return code

    def close(self):
        with self.lock:
            self.code = self.w = None

    def current(self):
        """The open code, or None."""
        with self.lock:
            self._expire()
            return self.code

    def _expire(self):
        if self.code is not None and self.clock() >= self.expires:
            self.code = self.w = None
            self.ended = "expired"
            self.log("pairing code expired; %s" % _NEW_CODE_HINT)

    def begin(self):
        """Count a try; return (serial, w), or raise AuthError saying why not."""
        with self.lock:
            self._expire()
            if self.code is None:
                why = {"expired": "the pairing code has expired (a code lasts %s)"
                       % _duration(self.lifetime),
                       "used": "the pairing code has been used",
                       "burned": "the pairing code was given up after %d wrong tries"
                       % PAIRING_TRIES}.get(self.ended, "no pairing code is open")
                raise AuthError("%s on this server: %s" % (why, _NEW_CODE_HINT))
            self.tries -= 1
            return self.serial, self.w, self.tries

    def failed(self, serial):
        """A wrong confirmation for a try of code serial: burn it after the last."""
        with self.lock:
            if serial == self.serial and self.code is not None and self.tries <= 0:
                self.code = self.w = None
                self.ended = "burned"
                burned = True
            else:
                burned = False
        if burned:
            self.log("pairing code given up after %d wrong tries; %s"
                     % (PAIRING_TRIES, _NEW_CODE_HINT))

    def refund(self, serial):
        """Give back the try of a right code that is not used up (a login to
        the web page, which several devices may make with one code)."""
        with self.lock:
            if serial == self.serial and self.code is not None:
                self.tries += 1

    def use(self, serial):
        """Use the code up for a right try; False if it ended meanwhile."""
        with self.lock:
            self._expire()
            if serial != self.serial or self.code is None:
                return False
            self.code = self.w = None
            self.ended = "used"
            return True


_NEW_CODE_HINT = "press Enter in serve's terminal for a new one"


def _client_pair(sock, rfile, code, w=None):
    """The client's pairing exchange on a connected socket (Protocol 4.11).

    Returns (token, fingerprint or None, server name).  AuthError for a
    wrong code (the server says so) or a server that cannot prove it knows
    the code; nothing is learned from a server that fails.
    """
    w = _code_scalar(code) if w is None else w
    flags, transcript = _client_hello(sock, rfile)
    if not flags & PF_AUTH_REQUIRED:
        raise AuthError("the server runs without a token (--no-auth): there is nothing to "
                        "pair; send to it directly")
    x = 1 + secrets.randbelow(_P256_N - 1)
    pa = _spake2_share(w, x, client=True)
    sock.sendall(_frame(_Msg.PAIR, _p256_encode(pa, compressed=True)))
    payload = _expect(rfile, _Msg.PAIR)
    try:
        if len(payload) != _SHARE_SIZE:
            raise ValueError("%d bytes" % len(payload))
        pb = _p256_decode(payload)
        k = _spake2_key(w, x, pb, client=True)
    except ValueError as e:
        raise ProtocolError("the server's PAIR share is not a valid point (%s)" % e) from None
    ke, confirm_a, confirm_b = _spake2_schedule(_SPAKE2_A, _SPAKE2_B, pa, pb, k, w, transcript)
    sock.sendall(_frame(_Msg.CONFIRM, confirm_a))
    payload = _expect(rfile, _Msg.PAIRED)
    if not hmac.compare_digest(payload[:_CONFIRM_SIZE], confirm_b):
        raise AuthError("the server could not prove it knows the pairing code")
    fields = _unseal(ke, payload[_CONFIRM_SIZE:]).split(b"\0")
    if len(fields) != 3 or not fields[0]:
        raise ProtocolError("the server's pairing answer has %d fields, not 3" % len(fields))
    token, fingerprint, name = (f.decode("utf-8", "replace") for f in fields)
    return token, fingerprint or None, name


def _pair(host, port, code, tls=False, timeout=DEFAULT_HANDSHAKE_TIMEOUT):
    """Pair with the server at host:port using code; return (token, fingerprint, name).

    Plain first unless tls; a server that requires TLS is asked again over
    TLS, whose certificate must then be the one it vouches for under the
    key the code gave (so TLS needs no pin of its own here).
    """
    code = _normalize_code(code)
    w = _code_scalar(code)
    where = _host_port_text(host, port)
    for over_tls in ((True,) if tls else (False, True)):
        try:
            sock = socket.create_connection((host, port), timeout)
        except OSError as e:
            raise ConnectError("cannot connect to %s: %s" % (where, e.strerror or e)) from None
        try:
            sock.settimeout(timeout)
            seen = None
            if over_tls:
                sock, seen, _ = _client_tls(sock, host, port, None, None)
            try:
                token, fingerprint, name = _client_pair(sock, _Reader(sock), code, w)
            except ProtocolError as e:
                if e.code == ST_TLS_REQUIRED and not over_tls:
                    continue
                raise
            if seen is not None and not (fingerprint and _same_fingerprint(seen, fingerprint)):
                raise AuthError("the TLS certificate of %s is not the one the server vouched "
                                "for under the pairing code: someone may be intercepting the "
                                "connection" % where)
            return token, fingerprint, name
        except XferError:
            raise
        except socket.timeout:
            raise ConnectError("%s did not finish the pairing exchange within %g s"
                               % (where, timeout)) from None
        except OSError as e:
            raise ConnectError("%s: connection lost while pairing: %s"
                               % (where, e.strerror or e)) from None
        finally:
            sock.close()
    raise ProtocolError("%s requires TLS, and refused it" % where)


#------------------------------------------------------------
# path safety and durable writes
#------------------------------------------------------------

# What ntpath.isreserved (3.13) refuses, checked here on every OS and
# version: device names (Windows reads the superscripts in COM\u00b9 as
# digits), plus COM0 and LPT0, which Microsoft's naming rules list too.
_WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [dev + digit for dev in ("COM", "LPT") for digit in "0123456789\u00b9\u00b2\u00b3"])
_WINDOWS_BAD_CHARS = frozenset('<>:"|?*')
_WINDOWS_CONTROLS = frozenset(chr(i) for i in range(32))
# Characters that change how a name displays without being visible:
# bidi controls and zero-width characters.
_INVISIBLE = ("\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d"
              "\u202e\u2066\u2067\u2068\u2069\ufeff")
# Control characters (C0, DEL, C1) and the invisible ones are escaped for
# display; names may contain none of them, nor a backslash.  So are lone
# surrogates: a local name that is not valid UTF-8 decodes to them
# (surrogateescape), and they show as the bytes they stand for.  A regular
# expression scans a name in C, not character by character in Python.
_UNSAFE_DISPLAY = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff%s]" % _INVISIBLE)
_UNSAFE_NAME = re.compile("[\\\\\\x00-\\x1f\\x7f-\\x9f%s]" % _INVISIBLE)


def _escape(match):
    o = ord(match.group())
    if 0xdc80 <= o <= 0xdcff:           # an undecodable byte (surrogateescape)
        return "\\x%02x" % (o - 0xdc00)
    return "\\x%02x" % o if o < 0x100 else "\\u%04x" % o


def _display(name, limit=200):
    """Text made safe for a terminal or a log: controls and undecodable bytes
    escaped (latin\\xe9.txt), length capped."""
    if isinstance(name, (bytes, bytearray)):
        name = name.decode("utf-8", "surrogateescape")
    if name.isascii() and name.isprintable():      # nothing to escape: most names
        text = name
    else:
        text = _UNSAFE_DISPLAY.sub(_escape, name)
    if limit is None or len(text) <= limit:
        return text
    return text[:limit // 2 - 3] + "..." + text[-(limit // 2):]


def _split_path(raw, portable=False, max_bytes=MAX_PATH_BYTES, max_depth=MAX_PATH_DEPTH,
                parent=None):
    """Validate a relative POSIX path from the wire; return its components.

    raw is bytes.  Refuses, never rewrites: anything that is not a plain
    relative path of safe names raises UnsafePathError.  parent, if given,
    is (raw of a directory ending in "/", its components) that these rules
    already passed, a prefix of raw: only the names after it are checked,
    so the files of one directory cost one check of it.
    """
    if len(raw) > max_bytes:
        raise UnsafePathError("path of %d bytes exceeds %d" % (len(raw), max_bytes),
                              raw[:100])
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsafePathError("path is not valid UTF-8", raw) from None
    if parent is not None and parent[0] and raw.startswith(parent[0]):
        known = parent[1]
        # The prefix ends with "/", so what follows it decodes on its own.
        parts = known + raw[len(parent[0]):].decode("utf-8").split("/")
    else:
        known = ()
        if not path:
            raise UnsafePathError("empty path", path)
        if path.startswith("/"):
            raise UnsafePathError("absolute path", path)
        parts = path.split("/")
    if len(parts) > max_depth:
        raise UnsafePathError("deeper than %d levels" % max_depth, path)
    for part in parts[len(known):]:
        if part in ("", ".", ".."):
            raise UnsafePathError("empty, '.' or '..' component", path)
        if len(part) > MAX_NAME_BYTES // 4 and len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise UnsafePathError("name longer than %d bytes" % MAX_NAME_BYTES, path)
        if _UNSAFE_NAME.search(part):
            raise UnsafePathError("backslash, control or invisible character", path)
        if part.startswith(PARTIAL_PREFIX):
            raise UnsafePathError("name reserved for partial files", path)
        if portable:
            _check_portable(part, path)
    if len(parts[0]) >= 2 and parts[0][1] == ":":
        raise UnsafePathError("drive letter", path)
    return parts


def _check_portable(part, path):
    """Refuse names Windows cannot store or treats as devices: the rules of
    ntpath.isreserved (3.13), which 3.8 lacks and which other OSes do not apply.
    """
    if _WINDOWS_CONTROLS.intersection(part):
        raise UnsafePathError("control character not allowed on Windows", path)
    if _WINDOWS_BAD_CHARS.intersection(part):
        raise UnsafePathError("character not allowed on Windows (<>:\"|?*)", path)
    if part[-1] in ". ":
        raise UnsafePathError("name ends with a dot or a space", path)
    # "nul.txt" and "nul .tar.gz" open the device too, in any case.
    if part.partition(".")[0].rstrip(" ").upper() in _WINDOWS_RESERVED:
        raise UnsafePathError("reserved device name on Windows", path)


_O_BINARY = getattr(os, "O_BINARY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_BINARY
_HAVE_DIR_FD = (bool(_O_NOFOLLOW and _O_DIRECTORY)
                and {os.open, os.mkdir, os.rename, os.stat, os.unlink} <= os.supports_dir_fd)


def _fsync_dir(fd):
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on directories
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise


def _load_syncfs():
    """syncfs(2) as a function of a descriptor, or None where it is missing or
    cannot report write errors (it can since Linux 5.8)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        release = re.match(r"(\d+)\.(\d+)", os.uname().release)
        if release is None or tuple(map(int, release.groups())) < (5, 8):
            return None
        import ctypes
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, ImportError, OSError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int

    def syncfs(fd):
        if call(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    return syncfs


def _load_noreplace():
    """renameat2(RENAME_NOREPLACE) as a function (dir_fd, src, dst) that renames
    within one directory and fails with EEXIST if dst is taken, in one system
    call; None where the system lacks it (not Linux, or a C library before it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        call = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, ImportError, OSError):
        return None
    # No argtypes: ctypes then passes ints as int and bytes as char * as they
    # are, without the per-argument conversion that doubles a call's cost.
    call.restype = ctypes.c_int
    utf8 = sys.getfilesystemencoding().lower().replace("-", "") == "utf8"

    def encode(name):       # os.fsencode, without its checks where the names are UTF-8
        return name.encode("utf-8", "surrogateescape") if utf8 else os.fsencode(name)

    def rename_noreplace(dir_fd, src, dst):
        if call(dir_fd, encode(src), dir_fd, encode(dst), 1) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), dst)
    return rename_noreplace


_NOREPLACE = []         # [_load_noreplace()] once a _Dest has asked


def _full_fsync(fd):
    if sys.platform == "darwin" and hasattr(os, "F_FULLFSYNC"):
        import fcntl
        try:
            fcntl.fcntl(fd, os.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


class _Dest:
    """Creates files below one destination directory without ever leaving it.

    With dir_fd support (Linux, macOS) every component is opened relative to
    its parent with O_NOFOLLOW, so a symlink anywhere below DIR is refused
    rather than followed.  Elsewhere (Windows) each component is checked
    with lstat just before use; a concurrent local attacker could still race
    that check, which the README documents.

    One instance serves one connection; it caches the last parent directory.
    A handle that leaves the cache stays open in `retired` until release():
    files held for a group commit still rename and sync through it.  The
    parent of each directory it creates stays open in `created` until
    forget_created(): the group commit syncs it, as the new entry is there.

    root_fd, a descriptor the caller keeps open, is DIR itself (the receiver
    opens it once at start): every walk starts there, so re-pointing a
    symlink named as DIR cannot move where the files go.  Without it, each
    walk starts from the path root.
    """

    def __init__(self, root, use_dir_fd=_HAVE_DIR_FD, root_fd=None):
        self.root = os.path.abspath(root)
        self.use_dir_fd = use_dir_fd
        self.root_fd = root_fd if use_dir_fd else None
        self._cached = None  # [parts tuple, fd or path, given out for a file]
        self.retired = []
        # dir_id of a parent -> [its handle, the paths (tuples of parts) of
        # the directories created in it]
        self.created = {}
        # The directory last found missing (CHECK): the answers for the
        # rest of its files need no system calls.
        self._missing = None
        # Temporary names: a random tag per connection and a counter.
        self._temp_tag = secrets.token_hex(4)
        self._temp_ids = itertools.count()
        if use_dir_fd and not _NOREPLACE:
            _NOREPLACE.append(_load_noreplace())
        self._noreplace = _NOREPLACE[0] if use_dir_fd else None

    def close(self):
        self.release()
        self.forget_created()
        if self._cached and self.use_dir_fd:
            os.close(self._cached[1])
        self._cached = None

    def forget_created(self):
        """Close the parents of created directories (once they are synced)."""
        if self.use_dir_fd:
            for handle, _ in self.created.values():
                os.close(handle)
        self.created = {}

    def _note_created(self, handle, parts):
        """Remember that the directory parts was created in handle; True if
        handle is kept (the first for that directory), else the caller closes it."""
        key = self.dir_id(handle)
        if key in self.created:
            self.created[key][1].append(parts)
            return False
        self.created[key] = [handle, [parts]]
        return True

    def release(self):
        """Close the parent handles that left the cache."""
        if self.use_dir_fd:
            for fd in self.retired:
                os.close(fd)
        self.retired = []

    # -- parent directories

    def parent(self, parts, path, create=True, held=True):
        """Return a handle (fd or path) on the directory holding parts[-1].

        create=False: None if a directory on the way does not exist.
        held=False: the caller is done with it on return (MKDIR), so once it
        leaves the cache it is closed at once instead of kept in retired.
        """
        key = tuple(parts[:-1])
        if self._cached and self._cached[0] == key:
            self._cached[2] = self._cached[2] or held
            return self._cached[1]
        if create:
            self._missing = None
        elif key == self._missing:
            return None         # the files of a new directory: asked about once
        try:
            handle = self._open_dirs(key, path, create)
        except FileNotFoundError:
            if create:
                raise
            self._missing = key
            return None
        if self._cached:
            if self._cached[2]:
                self.retired.append(self._cached[1])
            elif self.use_dir_fd:
                os.close(self._cached[1])
        self._cached = [key, handle, held]
        return handle

    def _open_dirs(self, dirs, path, create):
        if not self.use_dir_fd:
            current = self.root
            for i, name in enumerate(dirs):
                current = os.path.join(current, name)
                self._check_dir_path(current, path, create, dirs[:i + 1])
            return current
        if self.root_fd is not None:
            fd = os.open(".", os.O_RDONLY | _O_DIRECTORY, dir_fd=self.root_fd)
        else:
            fd = os.open(self.root, os.O_RDONLY | _O_DIRECTORY)
        for i, name in enumerate(dirs):
            # closes (or keeps in created) the parent, even on error
            fd = self._step(fd, name, path, create, dirs[:i + 1])
        return fd

    def makedirs(self, parts, path):
        """Create every directory of parts below the root (MKDIR)."""
        self.parent(list(parts) + [None], path, held=False)

    def _step(self, parent_fd, name, path, create, parts):
        """Open (creating if asked) name below parent_fd, refusing symlinks;
        parts is the path of name below the root."""
        flags = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW
        keep = False
        try:
            try:
                fd = os.open(name, flags, dir_fd=parent_fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(name, 0o777, dir_fd=parent_fd)
                except FileExistsError:
                    pass  # a concurrent creator won; open what it made (and sync it too)
                keep = self._note_created(parent_fd, parts)
                fd = os.open(name, flags, dir_fd=parent_fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                # O_DIRECTORY makes Linux report a symlink as ENOTDIR too.
                if e.errno == errno.ENOTDIR and not self._is_link(parent_fd, name):
                    raise UnsafePathError("a component is not a directory", path,
                                          code=ST_CONFLICT) from None
                raise UnsafePathError("a component is a symlink", path) from None
            raise
        finally:
            if not keep:
                os.close(parent_fd)
        return fd

    @staticmethod
    def _is_link(parent_fd, name):
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _check_dir_path(self, current, path, create, parts):
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if not create:
                raise
            try:
                os.mkdir(current)
            except FileExistsError:
                pass
            self._note_created(os.path.dirname(current), parts)
            st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode) or _is_reparse(st):
            raise UnsafePathError("a component is a symlink", path)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError("a component is not a directory", path, code=ST_CONFLICT)

    def stamp_dir(self, parts, path, mode, mtime_ns):
        """Set the permission bits (not on Windows) and mtime of the directory
        parts below the root, never through a symlink (get keeps a tree's)."""
        handle = self._open_dirs(tuple(parts), path, create=False)
        if not self.use_dir_fd:
            os.utime(handle, ns=(mtime_ns, mtime_ns))
            return
        try:
            os.fchmod(handle, mode)
            if _UTIME_FD:
                os.utime(handle, ns=(mtime_ns, mtime_ns))
            else:
                os.utime(".", ns=(mtime_ns, mtime_ns), dir_fd=handle)
        finally:
            os.close(handle)

    # -- files in a parent

    def lstat(self, handle, name):
        """lstat of name in the parent, or None if it does not exist."""
        try:
            if self.use_dir_fd:
                return os.stat(name, dir_fd=handle, follow_symlinks=False)
            return os.lstat(os.path.join(handle, name))
        except FileNotFoundError:
            return None

    def create_temp(self, handle, name, mode=0o600):
        """Create a new temporary file next to name; return (fd, temp_name)."""
        flags = _TEMP_FLAGS
        # Cut the name by bytes: a 255-byte name plus the prefix must fit.
        keep = name if len(name) <= 25 else _cut(name, 100)
        for _ in range(10):
            temp = "%s%s%x.%s" % (PARTIAL_PREFIX, self._temp_tag, next(self._temp_ids), keep)
            try:
                if self.use_dir_fd:
                    return os.open(temp, flags, mode, dir_fd=handle), temp
                return os.open(os.path.join(handle, temp), flags, mode), temp
            except FileExistsError:
                continue
        raise OSError(errno.EEXIST, "could not create a temporary file")

    def remove(self, handle, name):
        try:
            if self.use_dir_fd:
                os.unlink(name, dir_fd=handle)
            else:
                os.unlink(os.path.join(handle, name))
        except OSError:
            pass

    def open_partial(self, handle, temp):
        """Open (creating) a resumable partial for reading and writing; (fd, stat)."""
        flags = os.O_RDWR | os.O_CREAT | _O_NOFOLLOW | _O_BINARY
        if self.use_dir_fd:
            fd = os.open(temp, flags, 0o600, dir_fd=handle)
        else:
            path = os.path.join(handle, temp)
            st = self.lstat(handle, temp)
            if st is not None and (stat.S_ISLNK(st.st_mode) or _is_reparse(st)):
                raise UnsafePathError("a symlink stands where a partial file goes", temp)
            fd = os.open(path, flags, 0o600)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise UnsafePathError("a special file stands where a partial file goes", temp)
        return fd, st

    def open_served(self, where, st):
        """An _Outgoing on a file _walk_served yielded (where: its directory's
        handle and its name), never through a symlink."""
        handle, entry = where
        if isinstance(handle, int):
            return _Outgoing(entry, st, nofollow=True, dir_fd=handle)
        return _Outgoing(os.path.join(handle, entry), st, nofollow=True)

    def open_existing(self, handle, name):
        """Open an existing regular file for reading, never through a symlink."""
        flags = os.O_RDONLY | _O_NOFOLLOW | _O_BINARY
        if self.use_dir_fd:
            return os.open(name, flags, dir_fd=handle)
        return os.open(os.path.join(handle, name), flags)

    def dir_id(self, handle):
        """Identity of a parent directory, to tell whose partial is whose."""
        if self.use_dir_fd:
            st = os.fstat(handle)
            return st.st_dev, st.st_ino
        return os.path.normcase(handle)

    def publish(self, handle, temp, name, policy="replace", sync=True, path=None):
        """Move the finished temp file to its final name and sync the directory
        (unless sync is false: the caller syncs it, once for many files).

        policy "replace" renames over an existing regular file (atomic).  The
        others never clobber: "rename" picks "NAME (1).EXT", "NAME (2).EXT"...
        (_numbered) if the name is taken; "skip" and "fail" leave an existing file alone,
        returning None ("skip") or raising RemoteError ST_CONFLICT ("fail"),
        whose reason names path (the whole relative path), else name.
        Returns the final name.
        """
        if policy == "replace":
            self._rename(handle, temp, name, replace=True)
            if sync:
                self.sync(handle)
            return name
        candidates = [name]
        if policy == "rename":
            candidates = itertools.chain(candidates, _numbered(name))
        for candidate in candidates:
            try:
                self._rename(handle, temp, candidate, replace=False)
            except FileExistsError:
                continue
            if sync:
                self.sync(handle)
            return candidate
        if policy == "skip":
            return None
        if policy == "fail":
            raise RemoteError("%s: exists (the receiver refuses to replace files)"
                              % _display(path or name), ST_CONFLICT)
        raise RemoteError("%s: no free name for a renamed copy" % _display(path or name),
                          ST_CONFLICT)

    def rename_new(self, handle, temp, name):
        """Rename temp to name in one system call if nothing has that name;
        True if done, False if the name is taken or this system cannot say
        so in the same call (the caller then looks first: publish)."""
        noreplace = self._noreplace
        if noreplace is None:
            return False
        try:
            noreplace(handle, temp, name)
            return True
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
                self._noreplace = None      # not on this filesystem
                return False
            raise

    def _rename(self, handle, temp, name, replace):
        if self.use_dir_fd:
            if replace:
                os.rename(temp, name, src_dir_fd=handle, dst_dir_fd=handle)
                return
            # No clobber: a hard link fails with EEXIST if name is taken.
            try:
                os.link(temp, name, src_dir_fd=handle, dst_dir_fd=handle)
            except FileExistsError:
                raise
            except OSError:   # no hard links here (FAT, some network shares)
                if self.lstat(handle, name) is not None:
                    raise FileExistsError(errno.EEXIST, "exists", name) from None
                os.rename(temp, name, src_dir_fd=handle, dst_dir_fd=handle)
                return
            os.unlink(temp, dir_fd=handle)
            return
        src, dst = os.path.join(handle, temp), os.path.join(handle, name)
        if not replace and os.name != "nt" and self.lstat(handle, name) is not None:
            raise FileExistsError(errno.EEXIST, "exists", dst)
        move = os.replace if replace else os.rename   # os.rename never clobbers on Windows
        for delay in (0.01, 0.05, 0.1, 0.25, 0.5, None):
            try:
                move(src, dst)
                return
            except PermissionError:
                # Virus scanners and indexers hold new files open on Windows.
                if delay is None:
                    raise
                time.sleep(delay)

    def sync(self, handle):
        """Make the entries of a parent directory durable."""
        _sync_directory(handle)

    def final_path(self, parts):
        return os.path.join(self.root, *parts)


def _sync_directory(handle):
    """Make a directory's entries durable; handle is a descriptor, or a path
    (no dir_fd: nothing to do on Windows, where a rename is durable)."""
    if not isinstance(handle, str):
        _fsync_dir(handle)
    elif os.name != "nt":
        fd = os.open(handle, os.O_RDONLY)
        try:
            _fsync_dir(fd)
        finally:
            os.close(fd)


# The extension the rename policy keeps at the end of a name: the last
# suffix (a dot and 1-10 ASCII letters or digits), with the one before it
# when that is short and not just a number (".tar.gz", not ".2.zip").
_LAST_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,10}\Z")
_INNER_SUFFIX = re.compile(r"\.(?=[0-9]{0,3}[A-Za-z])[A-Za-z0-9]{1,4}\Z")


def _extension(name):
    """The part of name that "NAME (1).EXT" keeps after the number ("" if none)."""
    last = _LAST_SUFFIX.search(name)
    if last is None or last.start() == 0:        # no suffix, or a dot file
        return ""
    inner = _INNER_SUFFIX.search(name, 0, last.start())
    if inner is not None and inner.start() > 0:
        return name[inner.start():]
    return name[last.start():]


def _name_key(name):
    """A name compared the way the most forgiving filesystem would (case, normalization)."""
    return unicodedata.normalize("NFC", name).casefold()


def _one_or_more(value):
    """A tuple of value's items, or of value itself where it is one str or
    path (protect="/srv/xfer.ini", exclude="*.h264"), not its characters."""
    if isinstance(value, (str, bytes, os.PathLike)):
        return (value,)
    return tuple(value or ())


def _protected_parts(root, paths):
    """The paths below root, as tuples of _name_key components; others are dropped."""
    real = os.path.realpath(root)
    found = []
    for path in paths:
        try:
            rel = os.path.relpath(os.path.realpath(path), real)
        except ValueError:      # another drive (Windows)
            continue
        if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
            continue
        found.append(tuple(_name_key(p) for p in rel.split(os.sep)))
    return tuple(found)


def _numbered(name):
    """"stem (1).ext", "stem (2).ext", ... (999 of them), each at most
    MAX_NAME_BYTES long: the stem is cut (by whole characters) to fit."""
    ext = _extension(name)
    stem = name[:len(name) - len(ext)]
    for i in range(1, 1000):
        tail = " (%d)%s" % (i, ext)
        yield _cut(stem, MAX_NAME_BYTES - len(tail.encode("utf-8"))) + tail


if os.name == "nt":
    def _is_reparse(st):
        """A reparse point (a junction, a symlink): never followed or replaced."""
        return bool(st.st_file_attributes & stat.FILE_ATTRIBUTE_REPARSE_POINT)
else:
    def _is_reparse(st):
        return False            # elsewhere a link is S_ISLNK


#------------------------------------------------------------
# callbacks and dispatch
#------------------------------------------------------------

class _Dispatcher:
    """Runs callbacks now (dispatch="thread") or queues them for poll().

    In poll mode callbacks run in the order they were emitted.  Progress is
    coalesced: a job whose progress is already queued is not queued again
    (the callback reads the job when it runs, so it sees the newest state),
    and a host that polls slowly never builds a backlog of it.

    Once closed, callbacks are dropped: none starts and none is queued, so
    an owner that has stopped hears nothing more from its threads.
    """

    def __init__(self, mode, owner):
        if mode not in ("thread", "poll"):
            raise ValueError("dispatch must be 'thread' or 'poll', not %r" % (mode,))
        self.mode = mode
        self.owner = owner
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)    # notified when _running drops to 0
        self._running = 0           # callbacks running now on other threads
        self._closed = False
        self._events = collections.deque()   # (callback, arg, progress key or None)
        self._progress = set()               # keys of jobs whose progress is queued
        self.callback_errors = 0

    def emit(self, callback, arg, closed_too=False):
        """Run or queue callback(arg); closed_too: even once closed (the owner's
        own last word, said on the thread that closed it)."""
        self.emit_each(callback, (arg,), closed_too)

    def emit_each(self, callback, args, closed_too=False):
        """emit(callback, arg, closed_too) for each of args, in order, with
        one lock (the files one commit published)."""
        if callback is None:
            return
        if self.mode == "thread":
            if closed_too:
                self._run_each(callback, args)
            else:
                self.call(self._run_each, callback, args)
        else:
            with self._lock:
                if closed_too or not self._closed:
                    self._events.extend([(callback, arg, None) for arg in args])

    def _run_each(self, callback, args):
        for arg in args:
            self._run(callback, arg)

    def emit_progress(self, callback, job):
        if callback is None:
            return
        if self.mode == "thread":
            self.call(self._run, callback, job)
        else:
            key = id(job)        # stable: the queue holds the job
            with self._lock:
                if not self._closed and key not in self._progress:
                    self._progress.add(key)
                    self._events.append((callback, job, key))

    def call(self, function, *args):
        """function(*args) now, on this thread, unless closed (then nothing)."""
        with self._lock:
            if self._closed:
                return
            self._running += 1
        try:
            function(*args)
        finally:
            with self._lock:
                self._running -= 1
                if not self._running and self._closed:     # only close() waits
                    self._idle.notify_all()

    def close(self, deadline):
        """Drop every later callback; wait (until deadline) for those running.

        Callbacks already queued for poll() stay: the host asked for them.
        """
        with self._idle:
            self._closed = True
            while self._running and time.monotonic() < deadline:
                self._idle.wait(deadline - time.monotonic())

    def reopen(self):
        with self._lock:
            self._closed = False

    def poll(self, max_events=None):
        """Run queued callbacks on the calling thread; return how many ran.

        At most max_events run, and never more than were queued when poll()
        began (callbacks emitted meanwhile wait for the next poll), so one
        call is bounded even while transfers go on.  The rest stays queued,
        in order: a job's progress waits its turn like any callback, so
        progress that keeps coming cannot hold back an on_done.
        """
        with self._lock:
            limit = len(self._events)
        if max_events is not None:
            limit = min(limit, max_events)
        ran = 0
        while ran < limit:
            with self._lock:
                if not self._events:
                    break
                callback, arg, key = self._events.popleft()
                if key is not None:
                    self._progress.discard(key)
            self._run(callback, arg)
            ran += 1
        return ran

    def _run(self, callback, arg):
        try:
            callback(arg)
        except Exception:
            with self._lock:
                self.callback_errors += 1
            name = getattr(callback, "__name__", repr(callback))
            sys.stderr.write("xfer: callback %s raised an exception (ignored):\n%s"
                             % (name, traceback.format_exc()))


#------------------------------------------------------------
# receiving side
#------------------------------------------------------------

class FileInfo(collections.namedtuple("FileInfo", "path relpath size peer seconds digest")):
    """What on_file receives for each file that arrived and was verified.

    path: final absolute path on this machine; relpath: POSIX path relative
    to DIR; size: bytes; peer: sender address as "host:port"; seconds: time
    from header to durable file; digest: sha256 hex digest.
    """
    __slots__ = ()


class SessionInfo(collections.namedtuple(
        "SessionInfo", "peer files bytes skipped failed dirs clean seconds")):
    """What on_session receives when an authenticated connection ends.

    files and bytes: received and verified; skipped: not sent because they
    were already here; failed: refused or not stored; dirs: directories
    made or found (MKDIR); clean: True if the
    sender said BYE (False: the connection broke); seconds: its duration.
    """
    __slots__ = ()


class _AuthGuard:
    """Wrong tokens per address: the back-off, and their log at a bounded rate.

    After an address's nth wrong token in a row, its next try is refused
    unchecked for schedule[min(n, len(schedule)) - 1] seconds.  _Server
    refuses such a connection on the accepting thread, so a brute force
    holds no thread; check() refuses the ones admitted before the back-off
    began.  Other addresses are not affected.  The first wrong token of an
    address is logged; later ones (and tries refused during the back-off)
    are counted and summed up by tick() at most every interval seconds.
    """

    def __init__(self, schedule=AUTH_BACKOFF, log=None, clock=time.monotonic,
                 interval=AUTH_LOG_INTERVAL, max_addresses=AUTH_MAX_ADDRESSES,
                 forget=AUTH_FORGET):
        self.schedule = tuple(schedule) or (0.0,)
        self.log = log or (lambda line: None)
        self.clock = clock
        self.interval = interval
        self.max_addresses = max_addresses
        self.forget = forget
        self.lock = threading.Lock()
        # address -> [wrong tokens in a row, may try again at, last wrong at,
        #             logged at, wrong not logged, refused not logged,
        #             what was wrong: the nouns in the order first seen];
        # least recently failed first.
        self.addresses = collections.OrderedDict()
        self.pending = set()        # addresses with something not logged yet

    def wait(self, address, count=False):
        """Seconds before address may try a token again (0: now).

        With count, a try refused for that reason is counted for the log.
        """
        with self.lock:
            entry = self.addresses.get(address)
            if entry is None:
                return 0
            left = entry[1] - self.clock()
            if left <= 0:
                return 0
            if count:
                entry[5] += 1
                self.pending.add(address)
            return left

    def refusal(self, address, wait):
        """The reason an address backing off is refused: what it got wrong."""
        with self.lock:
            entry = self.addresses.get(address)
            nouns = entry[6] if entry is not None else ["token"]
        return "too many wrong %s from %s: try again in %d s" % (
            " and ".join(noun + "s" for noun in nouns), address, math.ceil(wait))

    def check(self, address, peer, right, what="token", detail=""):
        """Judge a proof from address (of a token, or with what="pairing code"
        a code's confirmation): right() says if it is correct; detail follows
        what in the log line.

        Returns 0 if it is, None if it is wrong (logged and counted), else
        the seconds the address must still wait (right() is not called).
        """
        with self.lock:     # one proof per address at a time: no parallel guesses
            entry = self.addresses.get(address)
            now = self.clock()
            if entry is not None and entry[1] > now:
                entry[5] += 1
                self.pending.add(address)
                return entry[1] - now
            if right():
                self.addresses.pop(address, None)
                self.pending.discard(address)
                return 0
            line = self._failed(address, peer, now, what, detail)
        if line:
            self.log(line)
        return None

    def failed(self, address, peer=None):
        """Count a wrong token from address (peer: "host:port" for the log)."""
        with self.lock:
            line = self._failed(address, peer, self.clock())
        if line:
            self.log(line)

    def _failed(self, address, peer, now, what="token", detail=""):
        entry = self.addresses.pop(address, None)
        if entry is None:
            while len(self.addresses) >= self.max_addresses:
                old, _ = self.addresses.popitem(last=False)
                self.pending.discard(old)
            entry = [0, now, now, None, 0, 0, []]
        self.addresses[address] = entry           # now the most recent
        entry[0] += 1
        entry[1] = now + self.schedule[min(entry[0], len(self.schedule)) - 1]
        entry[2] = now
        if what not in entry[6]:
            entry[6].append(what)
        if entry[3] is None or (not entry[4] and not entry[5]
                                and now - entry[3] >= self.interval):
            entry[3] = now
            return "%s: refused: wrong %s%s" % (peer or address, what, detail)
        entry[4] += 1
        self.pending.add(address)
        return None

    def succeeded(self, address):
        with self.lock:
            self.addresses.pop(address, None)
            self.pending.discard(address)

    def tick(self, final=False):
        """Log the summaries that are due (all of them if final); forget old entries."""
        lines = []
        with self.lock:
            now = self.clock()
            while self.addresses:
                address, entry = next(iter(self.addresses.items()))
                if now - entry[2] < self.forget or address in self.pending:
                    break
                del self.addresses[address]
            for address in list(self.pending):
                entry = self.addresses.get(address)
                if entry is None:
                    self.pending.discard(address)
                    continue
                if not final and now - entry[3] < self.interval:
                    continue
                line = "%d more %s attempt%s from %s" % (
                    entry[4], " and ".join("wrong-" + noun.replace(" ", "-")
                                           for noun in entry[6]),
                    "" if entry[4] == 1 else "s", address)
                if entry[5]:
                    line += "; %d refused unchecked while it waits" % entry[5]
                lines.append(line)
                entry[3], entry[4], entry[5] = now, 0, 0
                self.pending.discard(address)
        for line in lines:
            self.log(line)


class _Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    # process_request starts the connection threads itself: daemon threads,
    # so a host that never calls stop() can still exit, that stop() joins
    # with a bound (join_threads), which socketserver's own join lacks.
    # SO_REUSEADDR lets another process steal the port on Windows.
    allow_reuse_address = sys.platform != "win32"
    request_queue_size = 64

    def __init__(self, address, receiver):
        self.receiver = receiver
        # getaddrinfo takes 65536 as 0 (any port) and 70000 as 4464.
        port = _port_number(address[1])
        try:
            infos = socket.getaddrinfo(address[0] or None, port, 0, socket.SOCK_STREAM,
                                       0, socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise ConfigError("cannot resolve listen address %r: %s" % (address[0], e))
        family, _, _, _, sockaddr = infos[0]
        self.address_family = family
        self._slots = threading.BoundedSemaphore(receiver.max_connections)
        self._active = set()
        self._connection_threads = set()      # not ended yet
        self._per_address = collections.Counter()
        self._active_lock = threading.Lock()
        self._accept_failures = 0       # in a row, in the current episode
        self._accept_failing_since = 0.0
        super().__init__(sockaddr, _Handler)

    def get_request(self):
        try:
            request = super().get_request()
        except OSError as e:
            # Out of file descriptors: the listening socket stays readable,
            # so back off instead of spinning on accept().
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._accept_failed(e)
            raise
        if self._accept_failures:
            self.receiver._log("accepting again after %d failed accept%s in %s" % (
                self._accept_failures, "" if self._accept_failures == 1 else "s",
                _duration(round(time.monotonic() - self._accept_failing_since, 1))))
            self._accept_failures = 0
        return request

    def _accept_failed(self, error):
        """One line per episode, however long it lasts; then a growing pause."""
        if not self._accept_failures:
            self._accept_failing_since = time.monotonic()
            self.receiver._log("accept failed: %s; backing off until connections end"
                               % (error.strerror or error))
        self._accept_failures += 1
        first, most = self.receiver.accept_pause
        time.sleep(min(most, first * 2 ** min(self._accept_failures - 1, 16)))

    def service_actions(self):
        # Runs between polls of the serving loop (at most poll_interval apart).
        super().service_actions()
        self.receiver._auth.tick()
        self.receiver._pairing.current()        # logs a code's expiry

    def process_request(self, request, client_address):
        # Admission happens before authentication (RECEIVER-DEFENSES 1): a
        # global cap and a per-address cap, each answered with a prompt "busy",
        # and an address backing off after wrong tokens, refused the same way
        # (counted for the log, not logged one by one).
        peer = client_address[0]
        wait = self.receiver._auth.wait(peer, count=True) if self.receiver.token else 0
        if wait:
            self.receiver._refuse_busy(request, client_address,
                                       reason=self.receiver._auth.refusal(peer, wait))
            self.shutdown_request(request)
            return
        with self._active_lock:
            over = self._per_address[peer] >= self.receiver.max_per_address
            if not over:
                self._per_address[peer] += 1
        if over or not self._slots.acquire(blocking=False):
            if not over:
                self._release_address(peer)
            self.receiver._refuse_busy(request, client_address, per_address=over)
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self.process_request_thread,
                                  args=(request, client_address), name="xfer-connection",
                                  daemon=True)
        # Known before it runs, so stop() cuts and joins even one that has
        # not reached its first line yet.
        with self._active_lock:
            self._active.add(request)
            self._connection_threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._active_lock:
                self._active.discard(request)
                self._connection_threads.discard(thread)
            self._slots.release()
            self._release_address(peer)
            raise

    def _release_address(self, peer):
        with self._active_lock:
            self._per_address[peer] -= 1
            if self._per_address[peer] <= 0:
                del self._per_address[peer]

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._active_lock:
                self._active.discard(request)
                self._connection_threads.discard(threading.current_thread())
            self._release_address(client_address[0])
            self._slots.release()

    def join_threads(self, deadline):
        """Wait until every connection thread has ended or deadline passes;
        return True if all have."""
        with self._active_lock:
            threads = list(self._connection_threads)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    def close_active(self):
        with self._active_lock:
            active = list(self._active)
        for sock in active:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address):
        # One line per failed connection; socketserver's default prints a
        # traceback, which a hostile client could use to flood the log.
        exc = sys.exc_info()[1]
        self.receiver._log("%s: internal error: %s: %s"
                           % (_peer_text(client_address), type(exc).__name__, exc))


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        receiver = self.server.receiver
        receiver._session_class(receiver, self.request, self.client_address).run()


def _peer_text(address):
    host, port = address[0], address[1]
    return "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)


def _token_given(token):
    """A Sender's or Receiver's token: a str, or None ("" too) for none."""
    if token is not None and not isinstance(token, str):
        raise TypeError("token must be a str, not %r" % (token,))
    return token or None


def _seconds_fit(seconds, zero=False):
    """Whether a socket or a wait can take seconds: a number above 0 (zero:
    or 0) and at most SECONDS_MAX; never inf or nan."""
    return (seconds >= 0 if zero else seconds > 0) and seconds <= SECONDS_MAX


def _seconds_given(name, value, zero=False, none=True):
    """value as the seconds of the keyword argument name, None (no limit)
    kept where none; ValueError, naming it, for what no socket or wait can
    take."""
    if value is None and none:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError("%s must be a number of seconds, not %r" % (name, value)) from None
    if not _seconds_fit(seconds, zero):
        raise ValueError("%s must be %s 0 and at most %d seconds, not %r"
                         % (name, "at least" if zero else "more than", SECONDS_MAX, value))
    return seconds


class Receiver:
    """Receive files into a directory; serves in background threads.

    Methods for the caller: start(), stop(), poll(); usable as a context
    manager (start on entry, stop on exit).
    Attributes: address, status, files_received, bytes_received,
    files_failed, connections.  All methods are thread-safe; stop() must not
    be called from a callback running in dispatch="thread" mode.

    Private attributes a subclass may override (as socketserver's
    RequestHandlerClass; the tests inject faults this way): the classes
    each connection is built from, _session_class, _dest_class,
    _store_class, _incoming_class and _commit_class, each read once per
    connection, never per file; and the modules its clock and randomness
    come from, _time and _secrets.
    """

    #: (first, longest) pause in seconds after a failed accept()
    accept_pause = ACCEPT_PAUSE

    # The parts of a connection (see above); the classes defined after this
    # one are named at the end of this section.
    _dest_class = _Dest
    # Where its failed system calls happen, in their reasons (_failure).
    _side = "the receiver"
    _time = time
    _secrets = secrets

    def __init__(self, dir=".", host="0.0.0.0", port=DEFAULT_PORT, token=None,
                 dispatch="thread", on_file=None, on_status=None, on_session=None, log=None,
                 max_connections=DEFAULT_MAX_CONNECTIONS, max_size=None,
                 idle_timeout=DEFAULT_IDLE_TIMEOUT,
                 handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT,
                 portable_names=None, fsync=True, tls_cert=None, tls_key=None,
                 max_per_address=None, max_path_bytes=MAX_PATH_BYTES,
                 max_depth=MAX_PATH_DEPTH, max_frame=MAX_FRAME_PAYLOAD,
                 overwrite="replace", partial_max_age=DEFAULT_PARTIAL_MAX_AGE,
                 quiet=False, auth_backoff=AUTH_BACKOFF, body_min_bytes=BODY_MIN_BYTES,
                 body_window=BODY_WINDOW, protect=(), allow_get=False, name=None,
                 discovery=False, web=True, http_keep_alive=None, on_files=None):
        self.dir = os.path.abspath(os.path.expanduser(dir))
        #: clients with the token may read DIR (get, ls), read-only
        self.allow_get = allow_get
        #: the name discovery answers and pairing hands out (default: the host name)
        self.name = _server_name(name)
        #: answer discovery queries on UDP at the same port (README "find")
        self.discovery = discovery
        self._discovery = None
        #: serve the web page and the HTTP API on the same port (README "HTTP API")
        self.web = web
        self._web = None
        #: files no received name may reach (serve: its own config, keys, known_hosts)
        self.protect = list(_one_or_more(protect))
        self._protected = ()
        self.host = host
        self.port = port
        self.token = _token_given(token)
        self.on_file = on_file
        #: the FileInfo of the files one commit made durable together, a
        #: list in order, in one call (serve's log makes their lines at once)
        self.on_files = on_files
        self.on_status = on_status
        self.on_session = on_session
        self.log = log
        #: log refusals and errors only, no notices (serve -q)
        self.quiet = quiet
        self._auth = _AuthGuard(auth_backoff, self._log)
        self._pairing = _PairingCode(self._note)
        #: a body slower than body_min_bytes per body_window seconds is
        #: dropped (body_window None: never)
        self.body_min_bytes = int(body_min_bytes)
        self.body_window = _seconds_given("body_window", body_window)
        self.max_connections = int(max_connections)
        if self.max_connections < 1:
            raise ValueError("max_connections must be at least 1, not %r" % (max_connections,))
        if max_size is not None and (isinstance(max_size, bool)
                                     or not isinstance(max_size, int) or max_size < 0):
            raise ValueError("max_size must be a number of bytes (0 or more) or None, not %r"
                             % (max_size,))
        self.max_size = max_size
        self.idle_timeout = _seconds_given("idle_timeout", idle_timeout)
        #: seconds an HTTP connection may wait for its next request
        self.http_keep_alive = (self.idle_timeout if http_keep_alive is None
                                else _seconds_given("http_keep_alive", http_keep_alive))
        self.handshake_timeout = _seconds_given("handshake_timeout", handshake_timeout)
        self.portable_names = (os.name == "nt") if portable_names is None else portable_names
        self.fsync = fsync
        # Small files are synced a group at a time, with one syncfs() per
        # filesystem, where the system has it; else one fsync() each.
        self._syncfs = _load_syncfs() if fsync else None
        if overwrite not in OVERWRITE_POLICIES:
            raise ValueError("overwrite must be one of %s, not %r"
                             % (", ".join(OVERWRITE_POLICIES), overwrite))
        self.overwrite = overwrite
        self.partial_max_age = _seconds_given("partial_max_age", partial_max_age, zero=True)
        #: the process umask, read by start() where the system tells it
        #: without changing it (else None: every file gets an fchmod)
        self.umask = None
        self._stopping = False
        self._claims = {}           # resumable partial -> the session writing it
        self.files_resumed = 0
        self.bytes_resumed = 0
        self.max_path_bytes = int(max_path_bytes)
        self.max_depth = int(max_depth)
        self.max_frame = int(max_frame)
        #: set by start(): True when DIR treats "A" and "a" as one name
        self.case_insensitive = None
        self.max_per_address = (max(1, self.max_connections // 2) if max_per_address is None
                                else int(max_per_address))
        if tls_key and not tls_cert:
            raise ValueError("tls_key needs tls_cert, the certificate it goes with")
        self.tls_cert = tls_cert
        self.tls_key = tls_key or tls_cert
        #: SHA-256 fingerprint of the TLS certificate, once started with TLS
        self.fingerprint = None
        self._tls = None
        self._dispatch = _Dispatcher(dispatch, self)
        self._server = None
        self._thread = self._sweeper = None
        self._root_fd = None        # DIR, held open while serving (where dir_fd works)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)   # notified when a connection ends
        self.address = None
        self.status = "stopped"
        self.files_received = 0
        self.bytes_received = 0
        self.files_failed = 0
        self.connections = 0

    # -- methods for the caller

    def start(self):
        """Check DIR, bind and listen, and serve in a background thread.

        Returns once the socket is listening, so address is connectable.
        Raises XferError if DIR is unusable or the port cannot be bound.
        """
        self._prepare_dir()
        self.umask = _current_umask()
        self._stopping = False
        self._dispatch.reopen()
        if self.tls_cert:
            try:
                self._tls = _server_tls_context(self.tls_cert, self.tls_key)
                self.fingerprint = cert_fingerprint(_certificate_der(self.tls_cert))
            except BaseException:
                self._close_dir()
                raise
        try:
            self._server = _Server((self.host, self.port), self)
        except OSError as e:
            self._close_dir()
            why = "cannot listen on %s: %s" % (_host_port_text(self.host, self.port),
                                                e.strerror or e)
            self._set_status("error: " + why)
            raise XferError(why) from None
        self.address = self._server.server_address[:2]
        if self.web:
            self._web = _WebState(self)
        if self.discovery:
            try:
                self._discovery = _Discovery(self, self.address)
            except OSError as e:
                self._log("discovery off: cannot listen on UDP port %d: %s"
                          % (self.address[1], e.strerror or e))
        self._thread = threading.Thread(target=self._serve, args=(self._server,),
                                        name="xfer-receiver", daemon=True)
        self._thread.start()
        if self.partial_max_age is not None:
            self._sweeper = threading.Thread(target=self._sweep, args=(self._root_fd,),
                                             name="xfer-sweep", daemon=True)
            self._sweeper.start()
        self._set_status("listening")
        return self

    def _serve(self, server):
        try:
            server.serve_forever(poll_interval=0.1)
        except Exception as e:   # not expected; make it visible in status
            self._set_status("error: %s: %s" % (type(e).__name__, e))
            self._log("receiver stopped: %s: %s" % (type(e).__name__, e))

    def stop(self, grace=0.0):
        """Stop accepting, let files in flight finish, then end the connections.

        Each connection finishes the request it is on; for up to grace
        seconds the others are answered "shutting down" (transient, so a
        sender retries elsewhere or later) as they come.  Then every
        connection is closed; a large file cut off keeps its partial for a
        resume.  Blocks until the connection threads have ended, at most
        UNWIND_TIMEOUT seconds more: once it returns no callback runs and
        no log line is written; what a thread still running would report
        later is dropped.
        """
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        try:
            # Wakes the serving loop at once where the OS allows (Linux);
            # elsewhere it notices within its poll interval.
            server.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        server.shutdown()
        discovery, self._discovery = self._discovery, None
        if discovery is not None:
            discovery.stop()
        deadline = time.monotonic() + grace
        with self._idle:
            while self.connections and time.monotonic() < deadline:
                self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        server.close_active()
        server.server_close()
        if self._thread is not None:
            self._thread.join()
        deadline = time.monotonic() + UNWIND_TIMEOUT
        ended = server.join_threads(deadline)
        # After the join: the connections' last wrong tokens are summed up too.
        self._auth.tick(final=True)
        if self._web is not None:
            self._web.close()       # the chunked uploads keep their partials
        if self._sweeper is not None:
            self._sweeper.join(max(0.0, deadline - time.monotonic()))
            ended = ended and not self._sweeper.is_alive()
        if ended:
            # Else a thread still running may yet open directories through
            # it, and its number, reused, could name any directory: left open.
            self._close_dir()
        self._root_fd = None
        self._dispatch.close(deadline)
        self.status = "stopped"
        self._dispatch.emit(self.on_status, self.status, closed_too=True)

    def poll(self, max_events=None):
        """Run queued callbacks (dispatch="poll") on this thread; never blocks."""
        return self._dispatch.poll(max_events)

    def open_pairing(self, code=None, lifetime=PAIRING_LIFETIME):
        """Open a new pairing code (replacing any open one) and return it.

        It is valid for lifetime seconds and PAIRING_TRIES tries; the right
        one uses it up (README "Pairing").  Needs a token: pairing hands it
        to the sender.  Thread-safe.
        """
        if not self.token:
            raise XferError("pairing needs a token: a server without one (--no-auth) has "
                            "nothing to hand out")
        return self._pairing.open(code, _seconds_given("lifetime", lifetime, none=False))

    @property
    def pairing_code(self):
        """The open pairing code, or None (expired, used or given up)."""
        return self._pairing.current()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def callback_errors(self):
        return self._dispatch.callback_errors

    # -- internals

    def _prepare_dir(self):
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise XferError("%s is a file, not a directory" % self.dir)
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise XferError("cannot create %s: %s" % (self.dir, e.strerror or e)) from None
        if not os.path.isdir(self.dir):
            raise XferError("%s is not a directory" % self.dir)
        probe = os.path.join(self.dir, "%sprobe-%s" % (PARTIAL_PREFIX, secrets.token_hex(4)))
        try:
            with open(probe, "wb"):
                pass
            try:   # the probe's name is all lower case
                self.case_insensitive = os.path.exists(
                    os.path.join(self.dir, os.path.basename(probe).upper()))
            finally:
                os.unlink(probe)
        except OSError as e:
            raise XferError("cannot write into %s: %s" % (self.dir, e.strerror or e)) from None
        if _HAVE_DIR_FD:
            # Held for the server's lifetime: if DIR is a symlink, re-pointing
            # it later moves nothing (README "Guarantees").
            try:
                self._root_fd = os.open(self.dir, os.O_RDONLY | _O_DIRECTORY)
            except OSError as e:
                raise XferError("cannot open %s: %s" % (self.dir, e.strerror or e)) from None
        self._protected = _protected_parts(self.dir, self.protect)

    def _close_dir(self):
        fd, self._root_fd = self._root_fd, None
        if fd is not None:
            os.close(fd)

    def _disk_usage(self):
        """(free, total) bytes of DIR's file system, as it was opened at start."""
        if self._root_fd is not None and os.statvfs in os.supports_fd:
            st = os.statvfs(self._root_fd)
            return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
        usage = shutil.disk_usage(self.dir)
        return usage.free, usage.total

    def _receiving(self, claims, peer):
        """A (_Store, _GroupCommit) over DIR made of this receiver's parts,
        for one connection, upload or get; claims as for _Store."""
        store = self._store_class(self, self._dest_class(self.dir, root_fd=self._root_fd),
                                  claims=claims)
        return store, self._commit_class(store, self, peer)

    def _split(self, raw, parent=None):
        """raw's components by this receiver's name rules; parent as for _split_path."""
        parts = _split_path(raw, self.portable_names, self.max_path_bytes, self.max_depth,
                            parent)
        if self._protected:
            key = tuple(_name_key(p) for p in parts)
            for protected in self._protected:
                if key[:len(protected)] == protected:
                    raise UnsafePathError("xfer's own configuration; never written",
                                          "/".join(parts))
        return parts

    def _set_status(self, status):
        self.status = status
        self._dispatch.emit(self.on_status, status)

    def _note(self, line):
        """Log a notice: not a refusal or an error, so not when quiet."""
        if not self.quiet:
            self._log(line)

    def _log(self, line):
        if self.log is not None:
            self._dispatch.call(self._write_log, line)

    def _write_log(self, line):
        try:
            self.log(line)
        except Exception:
            pass

    def _refuse_busy(self, sock, address, per_address=False, reason=None):
        """Answer "busy" at once, on the accepting thread; reason, if given,
        is one the caller logs (or counts) itself."""
        if reason is None:
            if per_address:
                reason = "server busy: %d connections from %s already open" % (
                    self.max_per_address, address[0])
            else:
                reason = "server busy: %d connections already open" % self.max_connections
            self._log("%s: refused: %s" % (_peer_text(address), reason))
        answer = self._busy_answer(sock, reason)
        try:
            sock.settimeout(1.0)
            sock.sendall(answer)
        except OSError:
            pass

    def _busy_answer(self, sock, reason):
        """The bytes of a busy refusal: HTTP's to an HTTP request already
        there, else xfer's.  What has arrived is read (never waited for: the
        accepting thread never waits), so the close that follows does not
        reset the connection and lose the answer."""
        request = b""
        try:
            # The socket's own non-blocking mode, not MSG_DONTWAIT: Windows
            # has no such flag, and on a socket with a timeout a
            # MSG_DONTWAIT recv still waits that long.  The caller sets a
            # timeout again before it sends.
            sock.setblocking(False)
            request = sock.recv(HTTP_DRAIN_MAX)
        except OSError:
            pass
        if self.web and request and _http_method_byte(request[0]):
            return _http_plain_answer(503, ST_BUSY, reason)
        return _PREFACE.pack(MAGIC, PROTOCOL_VERSION, 0) + _encode_error(ST_BUSY, reason)

    def _discover_answer(self, nonce):
        """This server's answer to a discovery query (Protocol 7): no secret."""
        flags = ((DF_PAIRING if self.token and self._pairing.current() else 0)
                 | (DF_TLS if self._tls is not None else 0) | (DF_AUTH if self.token else 0))
        return _discover_answer(nonce, self.address[1], flags, self.name)

    def _wants_info(self):
        """Whether a FileInfo of each file is wanted (for on_file or on_files)."""
        return self.on_file is not None or self.on_files is not None

    def _count_files(self, count, size, resumed=0, resumed_bytes=0, infos=()):
        """Count files published together: count of them, size bytes in all,
        resumed of them resumed (resumed_bytes not sent again); infos: each
        one's FileInfo, in order, when _wants_info()."""
        with self._lock:
            self.files_received += count
            self.bytes_received += size
            self.files_resumed += resumed
            self.bytes_resumed += resumed_bytes
        if infos:
            if self.on_files is not None:
                self._dispatch.emit(self.on_files, infos)
            if self.on_file is not None:
                self._dispatch.emit_each(self.on_file, infos)

    def _claim(self, key, session):
        """Reserve a resumable partial for one connection; False if another keeps it.

        A dropped link (Wi-Fi gone, a sender killed) leaves no FIN behind, so
        the old connection may still hold the partial when its sender comes
        back on a new one.  A holder silent for CLAIM_SILENCE seconds is taken
        for that dead half and cut; it keeps the partial and lets go of it.
        A holder that is still receiving keeps it, and after a few seconds
        this connection writes a temporary file of its own instead.
        """
        deadline = time.monotonic() + CLAIM_SILENCE + 2.0
        with self._idle:
            while True:
                holder = self._claims.get(key)
                if holder is None:
                    self._claims[key] = session
                    return True
                now = time.monotonic()
                if now > deadline or self._stopping:   # stop() waits for this thread
                    return False
                if holder.silent_for() >= CLAIM_SILENCE:
                    holder.cut()
                self._idle.wait(0.05)

    def _unclaim(self, key):
        with self._idle:
            self._claims.pop(key, None)
            self._idle.notify_all()

    def _sweep(self, root_fd):
        """Delete partial files older than partial_max_age below DIR (start-up).

        A partial's age counts from when it was last written (_last_written),
        never from its mtime: a kept partial carries its source's mtime.
        Walks from root_fd where there is one, never through a symlink.
        """
        now = self._time.time()
        limit = now - self.partial_max_age
        removed = 0
        if root_fd is not None and hasattr(os, "fwalk"):
            walk = os.fwalk(".", dir_fd=root_fd)
        else:   # os.walk does not follow symlinks either
            walk = ((folder, dirs, files, None) for folder, dirs, files in os.walk(self.dir))
        try:
            for folder, _, files, dir_fd in walk:
                for name in files:
                    if not name.startswith(PARTIAL_PREFIX):
                        continue
                    path = name if dir_fd is not None else os.path.join(folder, name)
                    try:
                        st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode) and _last_written(st, now) < limit:
                            os.unlink(path, dir_fd=dir_fd)
                            removed += 1
                    except OSError:
                        continue
                if self._server is None:
                    return
        finally:
            walk.close()        # fwalk closes the descriptors it holds
        if removed:
            self._note("removed %d partial file%s older than %s" % (
                removed, "" if removed == 1 else "s", _duration(self.partial_max_age)))

    def _count_failure(self):
        with self._lock:
            self.files_failed += 1

    def _session_open(self):
        with self._lock:
            self.connections += 1

    def _session_closed(self, info):
        """A connection ended; info is its SessionInfo (None: it never
        finished the handshake, so on_session does not hear of it)."""
        with self._lock:
            self.connections -= 1
            self._idle.notify_all()
        if info is not None:
            self._dispatch.emit(self.on_session, info)

    def _sync(self, what, target):
        """Make target durable: the one way the receiving side syncs, so that a
        test can see what is synced, and when.

        what is "data" (a file's data; target its descriptor), "filesystem"
        (every file of target's file system: syncfs) or "directory" (the
        entries of a directory; target a _Dest handle).
        """
        if what == "data":
            _full_fsync(target)
        elif what == "filesystem":
            self._syncfs(target)
        elif what == "directory":
            _sync_directory(target)
        else:
            raise ValueError("unknown sync %r" % (what,))


def _current_umask():
    """The process umask, read without setting it (Linux /proc), or None."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _last_written(st, now, windows=(os.name == "nt")):
    """When a partial file was last written to, from its stat result.

    Its mtime says nothing: a partial kept for a resume carries its source's
    mtime, which may be years old or (a sender's clock ahead) in the future.
    On POSIX the status-change time moves with every write and with the
    stamp put on a kept partial, and nothing can set it back.  Windows has
    no change time in stat (st_ctime is the creation time there), so a kept
    partial's access time is set when it is kept; a partial left by a killed
    receiver still has the mtime of its last write, unless that lies in the
    future.
    """
    if not windows:
        return st.st_ctime
    return max(st.st_atime, st.st_mtime if st.st_mtime <= now else 0.0)


class _Drop(Exception):
    """End this connection quietly (already reported)."""


# The receiving side in the order a file's bytes meet it:
#
#   _ReceiveSession   one connection: handshake, then a loop that reads a
#                     frame and calls the handler of its kind; holds the
#                     answers back so they go out (and files are synced)
#                     in groups
#   _Store            the destination: names checked (path rules), every
#                     overwrite and name policy, temporary files, publish
#   _IncomingFile     one file: admitted by the store, written to a
#                     temporary file and hashed, verified, sealed; returns
#                     a verdict.  Takes bytes or a readinto() source, so it
#                     needs no socket.  _Drain reads a refused (or discarded)
#                     body the same way, storing nothing
#   _GroupCommit      the files sealed since the last commit: made durable,
#                     published, counted and reported, each exactly once;
#                     sets each one's verdict, which _Answers (a BATCH's or
#                     CHECKS's RESULTS) or a RESULT then carries
#
# A part reaches the Receiver through a few methods only: _split (name
# rules), _disk_usage, _sync (every sync), _claim/_unclaim (resumable
# partials), _count_files/_count_failure, _log, and _session_open/_session_closed.


# Verdicts that need no words.
_OK, _NEEDED = (ST_OK, ""), (ST_NEEDED, "")


class _Answers:
    """The answer to a BATCH or CHECKS: RESULTS for ids first, first + 1, ...

    Each item is a (status, reason), or a file held for the group commit,
    which sets its verdict before the answer goes out."""
    __slots__ = ("first", "items")

    def __init__(self, first, items):
        self.first = first
        self.items = items

    def frames(self):
        return _encode_results(self.first, [item if item.__class__ is tuple else item.verdict
                                            for item in self.items])


class _ReceiveSession:
    """One connection on the receiver: handshake, then requests until BYE."""

    def __init__(self, receiver, sock, address):
        self.r = receiver
        self.sock = self.raw_sock = sock
        self.address = address[0]
        self.peer = _peer_text(address)
        self.rfile = None
        self.seal = _untagged      # tags what this end sends, once keyed (Protocol 3.1)
        self.store, self.commit = receiver._receiving(self, self.peer)
        self.incoming_class = receiver._incoming_class
        self.ended = []         # HTTP: the commits of uploads finished on this connection
        self.buf = self.store.buf
        self.started = time.monotonic()
        self.clean = False      # ended with BYE (HTTP: not cut off mid-request)
        # Answers not sent yet, in request order: RESULT bytes, or an entry
        # (_IncomingFile, _NewDir) whose RESULT the group commit decides.
        self.out = []
        self.handlers = {_Msg.BATCH: self._on_batch, _Msg.FILE: self._on_file,
                         _Msg.CHECKS: self._on_checks, _Msg.CHECK: self._on_check,
                         _Msg.MKDIR: self._on_mkdir, _Msg.PING: self._on_ping,
                         _Msg.GET: self._on_get, _Msg.LIST: self._on_list}

    # -- lifecycle

    def run(self):
        self.r._session_open()
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        try:
            self._handshake()
            self.sock.settimeout(self.r.idle_timeout)
            if self.http:
                _HttpConnection(self).run()
            else:
                self._loop()
        except _Drop:
            if self.out:                 # a refusal said before hanging up
                self._send_quietly(b"")
        except socket.timeout:
            self.r._log("%s: dropped: silent for %ss" % (self.peer, self.r.idle_timeout))
        except XferError as e:
            self.r._log("%s: dropped: %s" % (self.peer, e))
            # A client reads a preface before any frame (Protocol 2).
            head = b"" if self._preface_sent else _PREFACE.pack(MAGIC, PROTOCOL_VERSION, 0)
            self._send_quietly(head + _encode_error(e.code, str(e)))
        except OSError as e:
            self.r._log("%s: connection lost: %s" % (self.peer, e.strerror or e))
        finally:
            # Files verified before the connection failed are stored all
            # the same; their sender will find them identical next time.
            self.commit.commit()
            self.store.close()
            try:
                if self.sock is not self.raw_sock:
                    self.sock.close()
            except OSError:
                pass
            self.r._session_closed(self._info())

    def _info(self):
        """This connection's SessionInfo; None if it never finished the
        handshake, or, over HTTP, stored and refused nothing (a page load is
        not a sender).  An upload counts where its last byte arrived."""
        commits = [self.commit] + self.ended
        files, size, skipped, failed = (sum(getattr(c, field) for c in commits)
                                        for field in ("files", "bytes", "skipped", "failed"))
        if not (self._handshake_done or (self.http and (files or skipped or failed))):
            return None
        return SessionInfo(self.peer, files, size, skipped, failed, self.commit.dirs,
                           self.clean, time.monotonic() - self.started)

    def cut(self):
        """End this connection from another thread: its reads fail at once."""
        try:
            self.raw_sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def silent_for(self):
        """Seconds since bytes last arrived (asked of a claim's holder: Receiver._claim)."""
        return time.monotonic() - self.rfile.last

    def claim(self, key):
        return self.r._claim(key, self)

    def unclaim(self, key):
        self.r._unclaim(key)

    # -- answers

    def _send(self, frame):
        """Send one frame after every answer held back."""
        self._flush(frame)

    def _send_quietly(self, data):
        try:
            self.sock.settimeout(1.0)
            self._flush(data)
        except OSError:
            pass

    def _flush(self, frame=b""):
        """Commit the held files, then send the held answers in order, and frame.

        Answers are held while more requests are already waiting to be read,
        so many go out in one write and files are synced in groups.  Each
        frame is tagged as it goes out, in the order it goes out.
        """
        self.commit.commit()
        out, self.out = self.out, []
        seal = self.seal
        frames = []
        for a in out:
            if a.__class__ is bytes:
                frames.append(seal(a))
            elif a.__class__ is _Answers:
                frames.extend(map(seal, a.frames()))
            else:                               # a file or directory the commit answered
                frames.append(seal(_encode_result(a.fid, *a.verdict)))
        if frame:
            frames.append(seal(frame))
        self.sock.sendall(b"".join(frames))

    def _refuse(self, fid, raw, code, reason):
        self.out.append(_encode_result(fid, *self.commit.refusal(raw, code, reason)))

    # -- handshake, the server's half (Protocol 4.1; the client's: _client_keys)

    _handshake_done = False
    _preface_sent = False
    _expired = False            # the handshake deadline passed
    http = False                # the client speaks HTTP (README "HTTP API")

    def _handshake(self):
        # The handshake has one absolute deadline that nothing the peer
        # sends can extend: a timer shuts the socket down when it passes.
        timer = threading.Timer(self.r.handshake_timeout, self._handshake_expired)
        timer.daemon = True
        timer.start()
        self.sock.settimeout(self.r.handshake_timeout)
        try:
            self._start_tls()
            self.rfile = _Reader(self.sock)
            if self.r.web and _http_method_byte(self.rfile.peek()):
                self.http = True        # its requests have deadlines of their own
                return
            self._handshake_steps()
        except (OSError, ConnectionClosedError) as e:
            if not self._handshake_done and (self._expired or isinstance(e, socket.timeout)):
                self._timed_out()
            raise
        finally:
            timer.cancel()

    def _handshake_expired(self):
        if not self._handshake_done:
            self._expired = True    # before the cut: the reads that fail ask
            self.cut()

    def _timed_out(self):
        self.r._log("%s: dropped: handshake timed out (not finished within %g s)"
                    % (self.peer, self.r.handshake_timeout))
        raise _Drop()

    def _start_tls(self):
        """Tell TLS from plain xfer by the first byte (Protocol 2), and wrap if TLS."""
        first = self.sock.recv(1, socket.MSG_PEEK)
        if not first:
            raise _Drop()
        tls = self.r._tls
        if first == b"\x16":                  # a TLS record: handshake
            if tls is None:
                self.r._log("%s: dropped: the client speaks TLS, this server is plain "
                            "(start it with --tls)" % self.peer)
                raise _Drop()
            try:
                self.sock = tls.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError) as e:
                self.r._log("%s: dropped: TLS handshake failed: %s"
                            % (self.peer, getattr(e, "reason", None) or e))
                raise _Drop() from None
        elif tls is not None and self.r.web and _http_method_byte(first[0]):
            self.r._log("%s: refused: plain HTTP to a TLS server" % self.peer)
            self._send_quietly(_http_tls_refusal(self.sock))
            raise _Drop()
        elif tls is not None:
            self.r._log("%s: refused: plain connection to a TLS server" % self.peer)
            self._send_quietly(_PREFACE.pack(MAGIC, PROTOCOL_VERSION, 0) + _encode_error(
                ST_TLS_REQUIRED, "this server requires TLS: send with --tls, or pin its "
                "certificate with --fingerprint %s" % self.r.fingerprint))
            raise _Drop()

    def _handshake_steps(self):
        """Preface, HELLO both ways, AUTH checked, AUTH_OK; keys the session."""
        token = self.r.token
        server_preface = _PREFACE.pack(MAGIC, PROTOCOL_VERSION,
                                       PF_AUTH_REQUIRED if token else 0)
        head = self._read_client_preface()
        client_nonce = _expect(self.rfile, _Msg.HELLO, _HANDSHAKE_FRAME_MAX)
        if len(client_nonce) != _NONCE_SIZE:
            raise ProtocolError("HELLO nonce of %d bytes, expected %d"
                                % (len(client_nonce), _NONCE_SIZE))
        server_nonce = self.r._secrets.token_bytes(_NONCE_SIZE)
        self._preface_sent = True
        self._send(server_preface + _frame(_Msg.HELLO, server_nonce))
        if self.rfile.at_end():
            # A sender hangs up here when it lacks what the server's flags
            # ask for: a token, or (having one) a server that asks for it.
            if self._expired:
                self._timed_out()
            if token:
                self.r._log('%s: refused: the sender has no token (it needs this server\'s '
                            'token: see "pairing")' % self.peer)
            else:
                self.r._log("%s: dropped: the sender hung up in the handshake (with a token "
                            "for this address it refuses a server that asks for none)"
                            % self.peer)
            raise _Drop()
        kind, proof = self.rfile.frame(_HANDSHAKE_FRAME_MAX)
        transcript = _transcript(head, client_nonce, server_preface, server_nonce)
        if kind == _Msg.PAIR:
            self._pair(proof, transcript)     # ends the connection
        if kind != _Msg.AUTH:
            raise ProtocolError("expected AUTH, got %s" % _msg_name(kind))
        if not token:
            self._send(_frame(_Msg.AUTH_OK, b""))
            self._handshake_done = True
            return
        want = _auth_mac(token, b"xfer client", transcript)
        wait = self.r._auth.check(self.address, self.peer,
                                  lambda: hmac.compare_digest(proof, want))
        if wait is None:
            self._send_quietly(_encode_error(ST_AUTH_FAILED, "wrong token"))
            raise _Drop()
        if wait:
            self._send_quietly(_encode_error(ST_BUSY, self.r._auth.refusal(self.address, wait)))
            raise _Drop()
        key = _auth_mac(token, b"xfer session", transcript)
        self._send(_frame(_Msg.AUTH_OK, _auth_mac(token, b"xfer server", transcript)))
        # Every later frame, both ways, is tagged (Protocol 3.1).
        self.rfile.tags, outgoing = _session_tags(key, server=True)
        self.seal = outgoing.seal
        self._handshake_done = True

    def _read_client_preface(self):
        """The client's 8-byte preface (Protocol 2); refuses another version."""
        head = self.rfile.read(_PREFACE.size)
        if not MAGIC.startswith(head[:len(MAGIC)]):
            self.r._log("%s: refused: not an xfer client (first bytes %r)"
                        % (self.peer, head[:8]))
            raise _Drop()
        if len(head) < _PREFACE.size:       # the start of a preface, then nothing
            if self._expired:
                self._timed_out()
            if head:
                self.r._log("%s: dropped: connection closed inside the preface (%d of %d "
                            "bytes)" % (self.peer, len(head), _PREFACE.size))
            raise _Drop()
        _, version, flags = _PREFACE.unpack(head)
        if version != PROTOCOL_VERSION:
            # The preface carries the client's own version: a client reads
            # past a preface of its version only, and then reads the reason.
            reason = _version_advice(version, "client")
            self.r._log("%s: refused: %s" % (self.peer, reason))
            self._send_quietly(_PREFACE.pack(MAGIC, version, 0)
                               + _encode_error(ST_VERSION, reason))
            raise _Drop()
        if flags:
            raise ProtocolError("the client set reserved preface flags 0x%04x" % flags)
        return head

    def _pair(self, share, transcript):
        """The server's side of pairing (Protocol 4.11), in place of AUTH.

        A try is counted before the share is answered; a wrong confirmation
        counts against the address like a wrong token (_AuthGuard).  Ends
        the connection (_Drop) whatever happens."""
        def refuse(status, reason):
            self._send_quietly(_encode_error(status, reason))
            raise _Drop()
        if not self.r.token:
            refuse(ST_AUTH_FAILED, "this server runs without a token (--no-auth): there is "
                   "nothing to pair")
        wait = self.r._auth.wait(self.address, count=True)
        if wait:
            refuse(ST_BUSY, self.r._auth.refusal(self.address, wait))
        try:
            if len(share) != _SHARE_SIZE:
                raise ValueError("%d bytes" % len(share))
            pa = _p256_decode(share)
        except ValueError as e:
            raise ProtocolError("PAIR share is not a compressed P-256 point (%s)" % e) from None
        try:
            serial, w, left = self.r._pairing.begin()
        except AuthError as e:
            self.r._log("%s: refused pairing: %s" % (self.peer, e))
            refuse(ST_AUTH_FAILED, str(e))
        y = 1 + self.r._secrets.randbelow(_P256_N - 1)
        pb = _spake2_share(w, y, client=False)
        try:
            k = _spake2_key(w, y, pa, client=False)
        except ValueError as e:
            raise ProtocolError("PAIR share refused: %s" % e) from None
        ke, confirm_a, confirm_b = _spake2_schedule(_SPAKE2_A, _SPAKE2_B, pa, pb, k, w,
                                                    transcript)
        self._send(_frame(_Msg.PAIR, _p256_encode(pb, compressed=True)))
        confirm = _expect(self.rfile, _Msg.CONFIRM, _HANDSHAKE_FRAME_MAX)
        verdict = self.r._auth.check(self.address, self.peer,
                                     lambda: hmac.compare_digest(confirm, confirm_a),
                                     what="pairing code", detail=" (%d %s left)"
                                     % (left, "try" if left == 1 else "tries"))
        if verdict is None:
            self.r._pairing.failed(serial)
            refuse(ST_AUTH_FAILED, "wrong pairing code")
        if verdict:
            refuse(ST_BUSY, self.r._auth.refusal(self.address, verdict))
        if not self.r._pairing.use(serial):
            refuse(ST_AUTH_FAILED, "the pairing code was used up meanwhile; ask for a new one")
        secret = b"\0".join(field.encode("utf-8") for field in (
            self.r.token, self.r.fingerprint or "", self.r.name))
        self._send(_frame(_Msg.PAIRED, confirm_b + _seal(ke, secret)))
        self.r._note("%s: paired as %s; the pairing code is used up (%s)"
                     % (self.peer, self.r.name, _NEW_CODE_HINT))
        raise _Drop()

    # -- requests (Protocol 4): one handler per kind

    def _loop(self):
        rfile, handlers, dest = self.rfile, self.handlers, self.store.dest
        limit = self.r.max_frame
        while True:
            # Send what is held before waiting: the sender may be waiting too.
            # A short pause first lets a group grow when requests arrive in
            # bursts, as they do over a real link.
            if self.out and not rfile.ready(_HOLD_PAUSE):
                self._flush()
            if self.r._stopping:
                # Between requests, so a file in flight is finished first.
                self._send(_encode_error(ST_SHUTDOWN, "the server is shutting down"))
                raise _Drop()
            if (len(self.out) >= _HOLD_MAX or len(self.commit.group) >= _HOLD_MAX
                    or len(dest.retired) + len(dest.created) > _HOLD_DIRS):
                self._flush()
            kind, payload = rfile.frame(limit)
            handler = handlers.get(kind)
            if handler is not None:
                handler(payload)
            elif kind == _Msg.BYE:
                self.clean = True
                self._send(_frame(_Msg.BYE))
                return
            else:
                raise ProtocolError("unexpected %s" % _msg_name(kind))

    def _on_ping(self, payload):
        try:
            free, total = self.r._disk_usage()
        except OSError:
            free = total = 0
        self._send(_frame(_Msg.PONG, _PONG.pack(free, total) + __version__.encode()))

    def _on_mkdir(self, payload):
        if len(payload) < _MKDIR.size:
            raise ProtocolError("MKDIR payload of %d bytes is too short" % len(payload))
        fid, mode = _MKDIR.unpack_from(payload)
        raw = payload[_MKDIR.size:]
        try:
            made = self.store.makedirs(fid, raw)
        except (XferError, OSError) as e:
            self._refuse(fid, raw, *_failure(raw, e))
            return
        # Answered by the group commit, once what was created is durable.
        self.out.append(made)
        self.commit.hold_dir(made)

    def _on_checks(self, payload):
        """CHECKS (Protocol 4.14): CHECK for many files of one directory, all
        answered in one RESULTS."""
        first, directory, entries = _decode_checks(payload)
        prefix = directory + b"/" if directory else b""
        check = self._check
        self.out.append(_Answers(first, [
            check(prefix + name, size, mtime_ns, digest) if b"/" not in name
            else self.commit.refusal(prefix + name, ST_BAD_PATH, "%s: a name in CHECKS "
                                     "holds a '/'" % _display(prefix + name))
            for size, mtime_ns, digest, name in entries]))

    def _on_check(self, payload):
        """CHECK (Protocol 4.8): is this file already here?  Answer, store nothing."""
        fid, size, mtime_ns, flags, digest, raw = _decode_check(payload)
        verdict = self._check(raw, size, mtime_ns, digest if flags & CF_CHECKSUM else None)
        self.out.append(_encode_result(fid, *verdict))

    def _check(self, raw, size, mtime_ns, digest):
        """One file's answer to CHECK: (ST_NEEDED, "") or (status, reason),
        a refusal counted as one."""
        try:
            verdict = self.store.check(raw, size, mtime_ns, digest)
        except (XferError, OSError) as e:
            verdict = _failure(raw, e)
        if verdict is None:
            return _NEEDED
        return self.commit.refusal(raw, *verdict)

    def _on_batch(self, payload):
        """BATCH (Protocol 4.12): the files' bodies follow, each stored or
        refused on its own (a refused one is read and dropped); one RESULTS
        answers them all, after the group commit made the stored ones durable."""
        first, entries = _decode_batch(payload)      # every limit, before a body byte
        readinto, buffered, items, fid = self.rfile.readinto, self.rfile.buffered, [], first
        left = sum(entry[0] for entry in entries)
        pace = _Pace(self.r, b"BATCH %d" % first, left)
        for size, mtime_ns, mode, flags, digest, raw in entries:
            left -= size
            sink = self._sink(fid, raw, size, mtime_ns, mode, flags, stream=True)
            try:
                body = buffered(size)
                if body is not None:
                    failure = sink.take(body, digest)   # hashed and written where it lies
                else:
                    pace.base = left
                    sink.begin()
                    sink.receive(readinto, size, pace)
                    failure = sink.finish(digest)
            except BaseException:
                sink.close()
                raise
            items.append(self._settle(raw, sink, failure))
            fid += 1
        self.out.append(_Answers(first, items))

    def _on_file(self, payload):
        """FILE (Protocol 4.2-4.3): admit, ACCEPT unless streamed, body, TRAILER."""
        fid, size, mtime_ns, mode, flags, raw = _decode_file(payload)
        stream = flags & FF_STREAM
        sink = self._sink(fid, raw, size, mtime_ns, mode, flags, stream)
        if not stream and sink.failure is not None:
            self._refuse(fid, raw, *sink.failure)     # before its body: no ACCEPT
            return
        try:
            start = 0
            if not stream:
                self._send(_frame(_Msg.ACCEPT, _ACCEPT.pack(fid, sink.offset, sink.prefix)))
                start = _read_body_start(self.rfile, fid, sink.offset)
            sink.begin(start)
            sink.receive(self.rfile.readinto, size - start, _Pace(self.r, raw, size - start))
            trailer_flags, their_digest = _read_trailer(self.rfile, fid)
            failure = sink.finish(their_digest, aborted=trailer_flags & TF_ABORT)
        except BaseException:
            # The connection failed mid-file.  A large file's partial stays,
            # stamped with the source's mtime, for the next attempt to resume.
            sink.close(keep=sink.in_body)
            raise
        verdict = self._settle(raw, sink, failure)
        self.out.append(verdict if verdict is sink else _encode_result(fid, *verdict))
        if sink.claim is not None:
            # A resumable partial's name is reserved only until its claim
            # goes: publish it before another connection may take that name.
            self.commit.commit()
            sink.close()

    def _sink(self, fid, raw, size, mtime_ns, mode, flags, stream):
        """Where a file's body goes: an _IncomingFile the store admitted, or a
        _Drain that reads and drops it (refused, or FF_DISCARD: verified only).
        The one way a body is refused, whatever message brought it."""
        if flags & FF_DISCARD:
            try:
                self.store.split(raw)
            except XferError as e:
                return _Drain(self.store, raw, _failure(raw, e))
            return _Drain(self.store, raw)
        incoming = self.incoming_class(self.store, fid, raw, size, mtime_ns, mode, stream)
        try:
            incoming.admit(resumable=not stream)
        except (XferError, OSError) as e:
            return _Drain(self.store, raw, _failure(raw, e))
        return incoming

    def _settle(self, raw, sink, failure):
        """A file whose body is in: its (status, reason) now, or the sink
        itself, held for the group commit, which decides (and answers) later."""
        if failure is not None:
            # The temp went before the answer, so a client that looks right
            # after a refusal never sees it.
            return self.commit.refusal(raw, *failure)
        if sink.__class__ is _Drain:
            return _OK                  # verified and dropped (FF_DISCARD)
        self.commit.hold(sink)
        return sink

    # -- reading DIR: GET and LIST (Protocol 4.9, 4.10)

    def _read_request(self, payload, known):
        """(id, flags, path) of a GET or LIST; None once its refusal is said."""
        if len(payload) < _GET.size:
            raise ProtocolError("GET or LIST payload of %d bytes is too short" % len(payload))
        fid, flags = _GET.unpack_from(payload)
        if flags & ~known:
            raise ProtocolError("request %d sets reserved flags 0x%02x" % (fid, flags & ~known))
        raw = payload[_GET.size:]
        self._flush()
        if not self.r.allow_get:
            self.r._log("%s: refused to read %s: reading is not allowed"
                        % (self.peer, _display(raw) or "DIR"))
            self._send(_frame(_Msg.DONE, _DONE.pack(fid, ST_DENIED) + (
                "this server does not let clients read its directory: start it with "
                "serve --allow-get (or allow_get = yes in [serve])").encode()))
            return None
        return fid, flags, raw

    def _served(self, raw):
        """(components, lstat, name the client gets) of a path below DIR.

        Every component is opened from DIR without following a symlink (as
        the store opens the directories it writes into): a symlink anywhere
        on the way is refused, so nothing outside DIR is ever reached."""
        if raw in (b"", b"."):
            return (), os.lstat(self.r.dir), ""
        parts = self.r._split(raw)
        st = _served_lstat(self.store.dest, parts, raw)
        if stat.S_ISLNK(st.st_mode) or _is_reparse(st):
            raise UnsafePathError("a symlink; never followed", raw)
        return tuple(parts), st, parts[-1]

    def _served_request(self, payload, known_flags):
        """A GET or LIST: (id, flags, raw path, path, stat, name) of what it
        names below DIR, or None once the refusal has been answered with DONE."""
        request = self._read_request(payload, known_flags)
        if request is None:
            return None
        fid, flags, raw = request
        try:
            parts, st, name = self._served(raw)
        except FileNotFoundError:
            self._done(fid, ST_BAD_PATH, "%s: no such file or directory" % _display(raw))
            return None
        except (XferError, OSError) as e:
            self._done(fid, *_failure(raw, e, "the server"))
            return None
        return fid, flags, raw, parts, st, name

    def _done(self, fid, code=ST_OK, reason=""):
        self._send(_frame(_Msg.DONE, _DONE.pack(fid, code)
                          + reason.encode("utf-8", "replace")[:4000]))

    def _on_get(self, payload):
        """GET: the file or tree at a path below DIR, flowing to the client as
        MKDIR, FILE, body and TRAILER frames, then DONE."""
        request = self._served_request(payload, GF_CHECKSUM)
        if request is None:
            return
        fid, flags, raw, parts, st, name = request
        out = _GetWriter(self, checksum=bool(flags & GF_CHECKSUM))
        walk_tree = stat.S_ISDIR(st.st_mode)
        walk = _walk_served(self.store.dest, parts, name, raw, walk_tree)
        # Directories whose entries are still coming, innermost last: each
        # gets its ENTRIES (mode, mtime) once its tree is sent (the walk is
        # depth first, so a tree's entries come together).
        open_dirs = []
        for kind, where, name, st in walk:
            while open_dirs and not name.startswith(open_dirs[-1][0] + "/"):
                out.dir_entry(fid, *open_dirs.pop())
            if kind == "dir":
                if name:
                    out.frame(_frame(_Msg.MKDIR, _MKDIR.pack(fid, stat.S_IMODE(st.st_mode))
                                     + name.encode("utf-8", "surrogateescape")))
                    open_dirs.append((name, st))
                continue
            wire = name.encode("utf-8", "surrogateescape")
            if kind == "file":
                failure = out.file(where, st, wire)
            elif kind == "other":
                # In a tree, skipped as send-dir skips them; named alone, refused.
                failure = (ST_SKIPPED if walk_tree else ST_CONFLICT,
                           "%s: a symlink or special file; not served" % _display(name))
            else:
                failure = _failure(wire, st, "the server")
            if failure is not None:
                out.frame(_encode_result(fid, *failure))
        while open_dirs:
            out.dir_entry(fid, *open_dirs.pop())
        out.flush()
        self._done(fid)

    def _on_list(self, payload):
        """LIST: the entries of a directory below DIR (of its tree with
        LF_RECURSIVE), in ENTRIES frames of at most MAX_FRAME_PAYLOAD, then DONE."""
        request = self._served_request(payload, LF_RECURSIVE)
        if request is None:
            return
        fid, flags, raw, parts, st, name = request
        dest = self.store.dest
        if not stat.S_ISDIR(st.st_mode):
            entries = _walk_served(dest, parts, name, raw, False)
        elif flags & LF_RECURSIVE:
            entries = _walk_served(dest, parts, "", raw)
        else:
            entries = _list_dir(dest, parts, raw)
        try:
            self._send_entries(fid, entries)
        except OSError as e:
            if isinstance(e, (socket.timeout, ConnectionError)):
                raise
            self._done(fid, *_failure(raw, e, "the server"))   # the directory cannot be read
            return
        self._done(fid)

    def _send_entries(self, fid, entries):
        """ENTRIES frames for (kind, path, name, stat) entries, sent as they fill."""
        head = struct.pack("!I", fid)
        chunk, size, frames = [head], len(head), []
        for kind, entry_path, entry_name, entry_st in entries:
            if kind == "dir":
                if not entry_name:
                    continue
                kind = ET_DIR
            elif kind == "file":
                kind = ET_FILE
            elif kind == "other":
                kind = ET_LINK if stat.S_ISLNK(entry_st.st_mode) else ET_OTHER
            else:
                continue        # a directory that cannot be listed: left out
            wire = entry_name.encode("utf-8", "surrogateescape")
            entry = _ENTRY.pack(kind, entry_st.st_size if kind == ET_FILE else 0,
                                entry_st.st_mtime_ns, stat.S_IMODE(entry_st.st_mode),
                                len(wire)) + wire
            if size + len(entry) > MAX_FRAME_PAYLOAD:
                frames.append(self.seal(_frame(_Msg.ENTRIES, b"".join(chunk))))
                chunk, size = [head], len(head)
                if len(frames) >= 4:        # streamed: never the whole listing at once
                    self.sock.sendall(b"".join(frames))
                    frames = []
            chunk.append(entry)
            size += len(entry)
        if len(chunk) > 1:
            frames.append(self.seal(_frame(_Msg.ENTRIES, b"".join(chunk))))
        if frames:
            self.sock.sendall(b"".join(frames))


def _served_lstat(dest, parts, raw):
    """lstat of the entry parts below dest's root, its directories opened
    without following a symlink (UnsafePathError for one on the way)."""
    handle = dest._open_dirs(tuple(parts[:-1]), raw, False)
    try:
        if dest.use_dir_fd:
            return os.stat(parts[-1], dir_fd=handle, follow_symlinks=False)
        return os.lstat(os.path.join(handle, parts[-1]))
    finally:
        if dest.use_dir_fd:
            os.close(handle)


def _walk_served(dest, parts, name, raw, tree=True):
    """What a server reads for GET and LIST: yield (kind, where, name, stat)
    for the tree at parts below dest's root, depth first, lazily, as
    _walk_tree does, except that no symlink is followed (a symlink or
    special file is yielded as "other"), the receiver's own partial files
    are left out, and every entry is reached from DIR through descriptors.
    Each directory is opened component by component with O_NOFOLLOW and
    listed through its descriptor, and each file is opened relative to it
    (where is (directory handle, entry name), valid until the walk goes
    on), so a directory replaced by a symlink after it was listed is
    refused, never followed out of DIR.  Without dir_fd (Windows) each
    component is checked with lstat just before use.

    kind is "dir" (stat of the directory), "file", "other" (its lstat), or
    "error" (the exception of a directory that cannot be opened or listed).
    tree=False: parts names one entry that is no directory, yielded alone.
    """
    if not tree:
        handle = dest._open_dirs(tuple(parts[:-1]), raw, False)
        try:
            st = _served_lstat(dest, parts, raw)
            kind = "file" if stat.S_ISREG(st.st_mode) else "other"
            yield kind, (handle, parts[-1]), name, st
        finally:
            if dest.use_dir_fd:
                os.close(handle)
        return
    stack = [(tuple(parts), name)]
    while stack:
        dparts, dname = stack.pop()
        subdirs = []
        for kind, where, entry, st in _list_dir(dest, dparts, raw, dname):
            if kind == "subdir":
                subdirs.append((dparts + (where,), entry))
            else:
                yield kind, where, entry, st
        stack.extend(reversed(subdirs))


def _list_dir(dest, parts, raw, name=None):
    """One directory's entries, through a descriptor on it opened from DIR
    without following a symlink: (kind, (handle, entry name), name, stat),
    its subdirectories as "dir", partial files left out.

    With name (a walk), the directory itself comes first as "dir" and its
    subdirectories as ("subdir", entry name, name for the walk, None), for
    the walk to descend into after its files.
    """
    try:
        handle = dest._open_dirs(tuple(parts), raw, False)
    except (XferError, OSError) as e:
        if name is None:
            raise
        yield "error", None, name, e
        return
    fd = handle if dest.use_dir_fd else None
    prefix = name + "/" if name else ""
    try:
        if name is not None:
            yield "dir", handle, name, os.fstat(fd) if fd is not None else os.lstat(handle)
        try:
            it = os.scandir(handle)
        except OSError as e:
            if name is None:
                raise
            yield "error", None, name, e
            return
        with it:
            for entry in it:
                if entry.name.startswith(PARTIAL_PREFIX):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if name is not None:
                            yield "subdir", entry.name, prefix + entry.name, None
                            continue
                        kind = "dir"
                    else:
                        kind = "file" if entry.is_file(follow_symlinks=False) else "other"
                    yield kind, (handle, entry.name), prefix + entry.name, entry.stat(
                        follow_symlinks=False)
                except OSError:
                    continue
    finally:
        if fd is not None:
            os.close(fd)


class _GetWriter:
    """The server's half of a GET: its frames and bodies, gathered into few
    writes, each frame tagged in the order it goes out (Protocol 4.9).

    Small files go many to a BATCH (4.12), as a pushing sender sends them;
    a larger one as FILE.  A file is read through _Outgoing (opened without
    following a symlink) and checked again after it was read: a small one
    that changed while it was read is not sent (a RESULT says so), a large
    one goes out with TF_ABORT, so the client discards it, never stores it
    torn.
    """

    def __init__(self, session, checksum=False):
        self.session = session
        self.checksum = checksum        # GF_CHECKSUM: a CHECK with the digest before each FILE
        self.seal = session.seal
        self.sock = session.sock
        self.parts = []
        self.size = 0
        self.last_id = 0                # file ids count from 1 in each GET
        # The BATCH being gathered: its entries and bodies; ids are given
        # when it goes out (send_batch).
        self.entries, self.bodies = [], []
        self.batch_bytes, self.batch_head = 0, _BATCH.size

    def frame(self, frame):
        self.send_batch()               # the files before it go before it
        self.write(self.seal(frame))

    def write(self, data):
        self.parts.append(data)
        self.size += len(data)
        if self.size >= _GATHER:
            self.flush()

    def flush(self):
        self.send_batch()
        if self.parts:
            data, self.parts, self.size = b"".join(self.parts), [], 0
            self.sock.sendall(data)

    def send_batch(self):
        """Send the gathered BATCH, its bodies after it (no answer comes)."""
        entries, bodies = self.entries, self.bodies
        if not entries:
            return
        first = self.last_id + 1
        self.last_id += len(entries)
        self.entries, self.bodies = [], []
        self.batch_bytes, self.batch_head = 0, _BATCH.size
        self.write(self.seal(_encode_batch(first, entries)))
        for body in bodies:
            self.write(body)

    def _batched(self, f, data, wire):
        """Add a small file, read whole, to the BATCH being gathered."""
        entry = _batch_entry(len(data), f.mtime_ns, stat.S_IMODE(f.mode), 0,
                             hashlib.sha256(data).digest(), wire)
        if self.entries and (len(self.entries) >= BATCH_FILES
                             or self.batch_bytes + len(data) > BATCH_BYTES
                             or self.batch_head + len(entry) > MAX_FRAME_PAYLOAD):
            self.send_batch()
        self.entries.append(entry)
        self.bodies.append(data)
        self.batch_bytes += len(data)
        self.batch_head += len(entry)

    def dir_entry(self, fid, name, st):
        """ENTRIES with the one entry of a directory whose tree is sent: the
        client sets its mode and mtime now, after its files (Protocol 4.9)."""
        wire = name.encode("utf-8", "surrogateescape")
        self.frame(_frame(_Msg.ENTRIES, struct.pack("!I", fid) + _ENTRY.pack(
            ET_DIR, 0, st.st_mtime_ns, stat.S_IMODE(st.st_mode), len(wire)) + wire))

    def file(self, where, st, wire):
        """Send one file (where: its directory's handle and its name, from
        _walk_served); None, or (status, reason) for a file not sent."""
        try:
            f = self.session.store.dest.open_served(where, st)
        except OSError as e:
            return _failure(wire, e, "the server")
        with f:
            try:
                now = os.fstat(f.fd)
                if not stat.S_ISREG(now.st_mode) or (now.st_ino, now.st_dev) != (
                        st.st_ino, st.st_dev):
                    return ST_CONFLICT, "%s: replaced while being served" % _display(wire)
                if f.size <= SMALL_MAX:
                    data = f.read_all()
                    if f.changed():
                        return ST_ABORTED, ("%s: changed on the server while it was read; not "
                                            "sent (get it again)" % _display(wire))
                    self._batched(f, data, wire)
                    return None
                self.send_batch()
                self.last_id += 1
                fid = self.last_id
                if self.checksum:       # read twice: the digest must go before the body
                    self._check(fid, f, _hash_fd(f.fd, self.session.buf).digest(), wire)
                    f.seek(0)
            except OSError as e:
                return _failure(wire, e, "the server")
            return self._large(f, fid, wire)

    def _check(self, fid, f, digest, wire):
        """The digest of the file about to be sent, for a client that compares
        content (GF_CHECKSUM): a CHECK, as a sender asks a receiver (4.8)."""
        self.frame(_frame(_Msg.CHECK, _CHECK.pack(fid, f.size, f.mtime_ns, CF_CHECKSUM, digest)
                          + wire))

    def _large(self, f, fid, wire):
        """A file over STREAM_MAX: FILE, the client's ACCEPT (or refusal),
        BODY from 0 or the verified offset, the body, TRAILER."""
        session = self.session
        self.frame(_encode_file(fid, f.size, f.mtime_ns, stat.S_IMODE(f.mode), 0, wire))
        self.flush()
        kind, payload = session.rfile.frame(MAX_FRAME_PAYLOAD)
        if kind == _Msg.RESULT:
            rid, status, _ = _decode_result(payload)
            if rid != fid:
                raise ProtocolError("RESULT for file %d while sending file %d" % (rid, fid))
            return None         # the client skips or refuses it, and says so itself
        if kind != _Msg.ACCEPT or len(payload) != _ACCEPT.size:
            raise ProtocolError("expected ACCEPT, got %s" % _msg_name(kind))
        aid, offset, prefix = _ACCEPT.unpack(payload)
        if aid != fid or offset >= f.size:
            raise ProtocolError("ACCEPT for file %d at %d; expected file %d below %d"
                                % (aid, offset, fid, f.size))
        h = hashlib.sha256()
        buf = session.buf
        start = 0
        if offset:
            try:
                _hash_prefix(f, h, offset, buf)
                same = hmac.compare_digest(h.digest(), prefix)
            except OSError:
                same = False
            if same:
                start = offset
            else:
                h = hashlib.sha256()
                f.seek(0)
        self.frame(_frame(_Msg.BODY, _BODY.pack(fid, start)))
        self.flush()
        view = memoryview(buf)
        left = f.size - start
        short = False
        while left:
            n = 0
            if not short:
                try:
                    n = f.readinto(view[:min(left, CHUNK)])
                except OSError:
                    n = 0
            if not n:               # it shrank: the count is kept, the file given up
                short = True
                n = min(left, CHUNK)
                view[:n] = bytes(n)
            h.update(view[:n])
            self.sock.sendall(view[:n])
            left -= n
        changed = short or f.changed()
        self.frame(_encode_trailer(fid, TF_ABORT if changed else 0, h.digest()))
        return None


class _Store:
    """The destination directory as the receiving parts see it: the name
    rules, every overwrite and name policy, and the files below DIR (a
    _Dest, which never leaves it).  One per connection or upload: it caches
    parent directories and the last name it split.

    rules is what decides (a Receiver): _split(raw) for the name rules,
    overwrite, max_size, case_insensitive, fsync, _syncfs, _disk_usage()
    and _sync(what, target), the one way anything is synced.  claims, if
    given, reserves resumable partials (claim(key) -> bool, unclaim(key));
    without it every file is written to a fresh temporary file.
    """

    def __init__(self, rules, dest, claims=None):
        self.rules = rules
        self.dest = dest
        self.claims = claims
        self.buf = bytearray(CHUNK)
        self.overwrite = rules.overwrite
        self.sync = rules._sync
        # A small file's data is synced with its group, one syncfs() for all.
        self.group_sync = bool(rules.fsync and rules._syncfs is not None
                               and dest.use_dir_fd)
        self.umask = getattr(rules, "umask", None) if os.name != "nt" else None
        self.side = rules._side         # where a failed system call happened (_failure)
        # Names a CHECK found needed, split, for the FILE that follows.
        self._needed = {}
        # The directory of the last path split: (its raw with a "/" after
        # it, its components).
        self._parent = (b"", [])

    #: Mixed into the names of resumable partials: an HTTP upload's carry its
    #: size and mtime, so it resumes only a partial of the very same upload
    #: (a page proves no prefix, as a sender does with ACCEPT).
    partial_key = ""

    def close(self):
        self.dest.close()

    # -- names

    def split(self, raw):
        """The components of raw (a list of its own), by the receiver's name
        rules (UnsafePathError).  A path a CHECK found needed is split once,
        for the CHECK, and its FILE takes those components."""
        parts = self._needed.pop(raw, None)
        if parts is None:
            # The files of one directory come together: its part of the
            # path is checked once, with the first of them.
            parent = self._parent
            parts = self.rules._split(raw, parent)
            head = raw[:raw.rfind(b"/") + 1]
            if head != parent[0]:
                self._parent = head, parts[:-1]
        return parts

    def _keep_split(self, raw, parts):
        if len(raw) > _NEEDED_PATH_MAX:
            return          # split again rather than hold a long path
        needed = self._needed
        if len(needed) >= _NEEDED_MAX:
            del needed[next(iter(needed))]      # the oldest: its FILE never came
        needed[raw] = parts

    def existing(self, handle, name, raw):
        """lstat of the final name, or None; refuses what may never be replaced."""
        st = self.dest.lstat(handle, name)
        if st is None:
            return None
        if stat.S_ISDIR(st.st_mode):
            raise RemoteError("%s: a directory of that name exists" % _display(raw),
                              ST_CONFLICT)
        if stat.S_ISLNK(st.st_mode) or _is_reparse(st):
            raise UnsafePathError("refusing to replace a symlink", raw)
        if not stat.S_ISREG(st.st_mode):
            raise RemoteError("%s: a special file of that name exists" % _display(raw),
                              ST_CONFLICT)
        if self.rules.case_insensitive:
            self._check_same_name(handle, name, raw)
        return st

    def _check_same_name(self, handle, name, raw):
        """On a case-insensitive filesystem, refuse a name that only matches an
        existing one by case or Unicode normalization (it would overwrite it)."""
        try:
            names = os.listdir(handle)
        except OSError:
            return
        if name in names:
            return
        folded = unicodedata.normalize("NFC", name).casefold()
        for other in names:
            if unicodedata.normalize("NFC", other).casefold() == folded:
                raise RemoteError("%s: differs only by case or Unicode form from the "
                                  "existing %s" % (_display(raw), _display(other)), ST_CONFLICT)

    def policy_refusal(self, raw):
        """The overwrite policy's answer for a file whose name is taken, or None."""
        policy = self.overwrite
        if policy == "skip":
            return ST_SKIPPED, "exists; not replaced (the receiver's policy)"
        if policy == "fail":
            return ST_CONFLICT, "%s: exists (the receiver refuses to replace files)" % (
                _display(raw))
        return None

    # -- questions before a body

    def check(self, raw, size, mtime_ns, digest=None):
        """CHECK: None if the file should be sent, else (status, reason)."""
        parts = self.split(raw)
        handle = self.dest.parent(parts, raw, create=False)
        if handle is None:
            self._keep_split(raw, parts)
            return None
        name = parts[-1]
        st = self.existing(handle, name, raw)
        if st is None:
            self._keep_split(raw, parts)
            return None
        if self._same(handle, name, st, size, mtime_ns, digest):
            return ST_SKIPPED, "identical"
        if self.overwrite == "rename":
            # A copy an earlier run stored under a numbered name is had too:
            # sending the same again must not pile up NAME (2), NAME (3)...
            for other in _numbered(name):
                st = self.dest.lstat(handle, other)
                if st is None:
                    break
                if stat.S_ISREG(st.st_mode) and self._same(handle, other, st, size,
                                                           mtime_ns, digest):
                    return ST_SKIPPED, "identical"
        return self.policy_refusal(raw)

    def _same(self, handle, name, st, size, mtime_ns, digest):
        """Whether the regular file name (its lstat st) holds what a CHECK
        describes: size and mtime (to the microsecond), or digest if given."""
        if st.st_size != size:
            return False
        if digest is None:
            return abs(st.st_mtime_ns - mtime_ns) < 1000
        return hmac.compare_digest(self._digest_of(handle, name), digest)

    def _digest_of(self, handle, name):
        fd = self.dest.open_existing(handle, name)
        try:
            return _hash_fd(fd, self.buf).digest()
        finally:
            os.close(fd)

    def admit(self, raw, size, stream=False):
        """Validate a file before its body; return (parts, parent handle, existed)
        or raise XferError (ST_SKIPPED under the "skip" policy) or OSError.

        Limits come before any byte is written.  A streamed file's body
        arrives whatever the answer, so under the "replace" policy its name
        is looked at only once, right before the rename (publish), which
        refuses what may not be replaced.
        """
        parts = self.split(raw)
        rules = self.rules
        if rules.max_size is not None and size > rules.max_size:
            have, limit = _human(size), _human(rules.max_size)
            if have == limit:       # too close to tell apart when rounded
                have, limit = "{:,} bytes".format(size), "{:,} bytes".format(rules.max_size)
            raise RemoteError("%s: %s is over the receiver's limit of %s"
                              % (_display(raw), have, limit), ST_TOO_LARGE)
        if size > 1 << 20:
            free = rules._disk_usage()[0]
            if size > free:
                raise RemoteError("%s: not enough space: need %s, have %s"
                                  % (_display(raw), _human(size), _human(free)), ST_NO_SPACE)
        handle = self.dest.parent(parts, raw)
        if stream and self.overwrite == "replace":
            return parts, handle, False
        existed = self.existing(handle, parts[-1], raw) is not None
        if existed:
            refusal = self.policy_refusal(raw)
            if refusal is not None:
                raise _error_for(*refusal) if refusal[0] != ST_SKIPPED else \
                    RemoteError(refusal[1], ST_SKIPPED)
        return parts, handle, existed

    def makedirs(self, fid, raw):
        """MKDIR: create every directory of raw; the _NewDir to commit."""
        parts = self.split(raw)
        self.dest.makedirs(parts, raw)
        return _NewDir(fid, raw, parts)

    # -- temporary files

    def create_mode(self, mode):
        """(mode to create a temporary file with, True if that is its final mode).

        Where the umask is known (read when the receiver starts) and leaves
        the sender's permission bits alone, a temp is created with them and
        needs no fchmod; else it is created 0600 and sealed with fchmod.
        """
        perm = stat.S_IMODE(mode) & 0o777     # never setuid, setgid or sticky
        umask = self.umask
        if umask is not None and not perm & umask and perm & 0o600 == 0o600:
            return perm, True
        return 0o600, False

    def open_partial(self, handle, parts, size, mtime_ns):
        """A resumable partial for a large file, reserved for this connection:
        (fd, temp name, claim key, offset, prefix hasher) or None if another
        connection keeps it (the caller then writes a temporary file)."""
        if self.claims is None:
            return None
        name = parts[-1]
        key = hashlib.sha256(("/".join(parts) + self.partial_key).encode("utf-8")).hexdigest()[:16]
        temp = "%s%s.%s" % (PARTIAL_PREFIX, key, _cut(name, 100))
        claim = (self.dest.dir_id(handle), temp)
        if not self.claims.claim(claim):
            return None
        try:
            fd, st = self.dest.open_partial(handle, temp)
        except BaseException:
            self.claims.unclaim(claim)
            raise
        # A partial kept when its connection dropped carries the source's
        # mtime; one left by a receiver that was killed carries the time of
        # its last write, later than the mtime of the file it was receiving.
        # Either may be resumed; the sender still proves the prefix equal
        # before it is reused.
        if 0 < st.st_size < size and st.st_mtime_ns >= mtime_ns:
            return fd, temp, claim, st.st_size, _hash_fd(fd, self.buf)
        return fd, temp, claim, 0, None

    def release(self, handle, fd, temp, claim, keep=False, mtime_ns=0):
        """Close a temporary file; keep it for a resume, or remove it."""
        # A kept partial carries the source's mtime (what a resume compares)
        # and, as its access time, when it was kept (what the start-up sweep
        # counts from on Windows: _last_written).
        times = (time.time_ns(), mtime_ns)
        try:
            if fd is not None:
                if keep:
                    try:
                        os.utime(fd, ns=times) if _UTIME_FD else None
                    except OSError:
                        keep = False
                os.close(fd)
            if not keep:
                if temp is not None:
                    self.dest.remove(handle, temp)
            elif not _UTIME_FD:
                try:
                    os.utime(os.path.join(handle, temp), ns=times)
                except OSError:
                    self.dest.remove(handle, temp)
        finally:
            if claim is not None:
                self.claims.unclaim(claim)

    # -- publishing (called by the group commit)

    def publish(self, handle, temp, parts, raw, existed):
        """Rename a sealed temp file into place, its directory not yet synced.

        Returns (final name or None if the policy skipped it, note for RESULT);
        the temp is gone either way, unless it raises.
        """
        name = parts[-1]
        policy = self.overwrite
        if self.dest.rename_new(handle, temp, name):
            # Nothing had the name, so there was nothing to refuse or keep.
            return name, "replaced" if existed and policy == "replace" else ""
        # Check again right before the rename: a directory or symlink may
        # have appeared under the final name while the body was arriving.
        existed = self.existing(handle, name, raw) is not None or existed
        final = self.dest.publish(handle, temp, name, policy, sync=False, path=raw)
        if final is None:
            self.dest.remove(handle, temp)
            return None, "exists; not replaced (the receiver's policy)"
        if final != name:
            return final, "renamed to %s" % final
        return final, "replaced" if existed and policy == "replace" else ""


_UTIME_FD = os.utime in os.supports_fd
#: Receiver: paths a CHECK found needed whose components it keeps for their FILE
#: (at most this many, each at most _NEEDED_PATH_MAX bytes long).
_NEEDED_MAX = 2 * CHECK_AHEAD
_NEEDED_PATH_MAX = 512


class _Sink:
    """What a body is read into, whatever message brought it: an
    _IncomingFile, or a _Drain.  begin(start), write(data) per piece or
    receive(readinto, count), then finish(their_digest) gives the verdict:
    None, or (status, reason)."""
    __slots__ = ()

    def take(self, body, their_digest):
        """begin(), write(body) and finish(their_digest) for a whole body
        already in memory (a small file of a BATCH): the verdict."""
        self.begin()
        self.write(body)
        return self.finish(their_digest)


class _IncomingFile(_Sink):
    """One file arriving: admitted by the store, written to a temporary file
    while hashed, verified against the sender's digest, sealed (synced, mode
    and mtime set).  finish() gives the verdict; a file that passes then
    waits in the group commit, which publishes it and sets its answer.

    Knows nothing of sockets: the body comes from write(bytes) calls or
    from receive(readinto, count), so a push session, a pull client or an
    HTTP upload can all end in the same store.
    """
    # Defaults, so that a new file sets only what its header says.
    parts = handle = fd = temp = claim = None
    hasher = write_error = digest = None
    existed = in_body = unsynced = final_mode = False
    offset = resumed = 0
    prefix = bytes(32)          # the sha256 of a resumable prefix (none: zeros)
    final = note = failure = verdict = None

    def __init__(self, store, fid, raw, size, mtime_ns, mode, stream=True):
        self.store = store
        self.fid = fid
        self.raw = raw
        self.size = size
        self.mtime_ns = mtime_ns
        self.mode = mode
        self.stream = stream
        self.started = time.monotonic()

    def admit(self, resumable=False):
        """Check the name, limits and policy, and open the temporary file
        (resumable: a large file's partial, which a later try may resume
        from offset, whose sha256 is prefix).  Raises XferError or OSError."""
        store = self.store
        self.parts, self.handle, self.existed = store.admit(self.raw, self.size, self.stream)
        if resumable:
            got = store.open_partial(self.handle, self.parts, self.size, self.mtime_ns)
            if got is not None:
                self.fd, self.temp, self.claim, self.offset, self.hasher = got
                if self.hasher is not None:
                    self.prefix = self.hasher.digest()
                return
        mode, self.final_mode = store.create_mode(self.mode)
        self.fd, self.temp = store.dest.create_temp(self.handle, self.parts[-1], mode)

    def take(self, body, their_digest):
        """A whole body already in memory (a small file of a BATCH): hashed in
        one call, written, and the verdict, as begin(), write(), finish()."""
        if self.claim is not None:
            return _Sink.take(self, body, their_digest)
        self.hasher = hashlib.sha256(body)
        self._write_at(self.fd, body)
        return self.finish(their_digest)

    def begin(self, start=0):
        """The body starts at start: 0, or the offset offered for a resume."""
        if start:
            self.resumed = start
        else:
            self.hasher = None
            if self.claim is not None:
                os.ftruncate(self.fd, 0)
        if self.claim is not None:
            os.lseek(self.fd, start, os.SEEK_SET)
        if self.hasher is None:
            self.hasher = hashlib.sha256()
        # From here a connection lost keeps a resumable partial.
        self.in_body = self.claim is not None

    def write(self, data):
        """Hash and write one piece of the body.  A write error is kept for
        finish(); later pieces are hashed, not written, so the caller stays
        in step with its source."""
        self.hasher.update(data)
        self._write_at(self.fd, data)

    def _write_at(self, fd, chunk):
        """Write chunk to fd, unless an earlier write failed (then keep the error)."""
        if self.write_error is None:
            try:
                while chunk:
                    chunk = chunk[os.write(fd, chunk):]
            except OSError as e:
                self.write_error = e

    def receive(self, readinto, count, pace=None):
        """Read count bytes of body from readinto(view) (0: the source ended).

        A large body is hashed on a helper thread while the next piece is
        received and this one written: hashlib, recv and write all release
        the GIL, so they overlap.  A piece is filled before it is handed
        over, however little each read brings (a slower link brings less),
        so the threads meet once per _HASH_CHUNK.
        """
        if count < _HASH_BEHIND_MIN:
            _take_body(readinto, count, self.store.buf, self.write, self.raw, pace)
            self.in_body = False
            return
        free = queue.Queue()        # buffers whose bytes are hashed, to receive into
        for _ in range(3):
            free.put(bytearray(_HASH_CHUNK))
        todo = queue.Queue()        # chunks to hash, in order
        digest = self.hasher

        def hash_behind():
            while True:
                chunk = todo.get()
                if chunk is None:
                    return
                digest.update(chunk)
                free.put(chunk.obj)

        helper = threading.Thread(target=hash_behind, name="xfer-hash", daemon=True)
        helper.start()
        fd = self.fd
        try:
            while count:
                view = memoryview(free.get())
                n, want = 0, min(count, _HASH_CHUNK)
                try:
                    while n < want:
                        got = readinto(view[n:want])
                        if not got:
                            raise ConnectionClosedError(
                                "%s: connection closed with %s still to come"
                                % (_display(self.raw), _human(count - n)))
                        n += got
                        if pace is not None:
                            pace.check(count - n)
                except BaseException:
                    # What did arrive stays in a resumable partial.
                    self._write_at(fd, view[:n])
                    raise
                chunk = view[:n]
                todo.put(chunk)
                self._write_at(fd, chunk)
                count -= n
        finally:
            todo.put(None)
            helper.join()
        self.in_body = False

    def finish(self, their_digest, aborted=False):
        """The verdict once the body is in: None if the file is verified and
        sealed (ready for the group commit), else (status, reason) for its
        RESULT, the temporary file already gone."""
        self.in_body = False
        raw = self.raw
        if aborted:
            failure = (ST_ABORTED, "%s: the sender gave it up" % _display(raw))
        elif self.write_error is not None:
            failure = _failure(raw, self.write_error, self.store.side)
        elif not hmac.compare_digest(mine := self.hasher.digest(), their_digest):
            failure = (ST_INTEGRITY, "%s: sha256 mismatch, file discarded" % _display(raw))
        else:
            fd, self.fd = self.fd, None          # seal closes it, whatever happens
            self.unsynced = self.stream and self.store.group_sync
            try:
                self.seal(fd)
            except OSError as e:
                failure = _failure(raw, e, self.store.side)
            else:
                self.digest = mine.hex()
                self.hasher = None
                # Durable but not yet in place: the group commit renames it
                # and syncs its directory.  No descriptor stays open while it
                # waits.  A resumable partial stays claimed until close().
                return None
        self.close(keep=False)
        self.failure = failure
        return failure

    def seal(self, fd):
        """Sync the data (unless its group's commit does), set mode and mtime;
        close fd."""
        store = self.store
        mtime_ns = self.mtime_ns
        try:
            if store.rules.fsync and not self.unsynced:
                store.sync("data", fd)
            if os.name != "nt" and not self.final_mode:
                os.fchmod(fd, stat.S_IMODE(self.mode) & 0o777)
            if _UTIME_FD:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)
        if not _UTIME_FD:
            path = os.path.join(self.handle, self.temp)
            os.utime(path, ns=(mtime_ns, mtime_ns))
            if os.name == "nt" and not self.mode & 0o200:
                os.chmod(path, stat.S_IREAD)

    def close(self, keep=False):
        """Let go of the temporary file and of its claim: keep it (a partial
        for a resume) or remove it (if the group commit has not published it)."""
        fd, self.fd = self.fd, None
        claim, self.claim = self.claim, None
        temp, self.temp = self.temp, None
        if fd is not None or claim is not None or temp is not None:
            self.store.release(self.handle, fd, temp, claim, keep=keep,
                               mtime_ns=self.mtime_ns)

    def fail(self, error):
        self.failure = _failure(self.raw, error, self.store.side)



class _Drain(_Sink):
    """A body that is not stored: read and dropped, so that the stream stays
    in step.  Refused (failure given), the refusal is its verdict; else
    (FF_DISCARD) it is hashed and verified like any file.  Read like an
    _IncomingFile, so a refused body is drained the same way whichever
    message brought it (FILE, BATCH)."""
    __slots__ = ("store", "raw", "failure", "hasher")
    offset, prefix, claim, in_body = 0, bytes(32), None, False

    def __init__(self, store, raw, failure=None):
        self.store = store
        self.raw = raw
        self.failure = failure
        self.hasher = None

    def begin(self, start=0):
        if self.failure is None:
            self.hasher = hashlib.sha256()

    def receive(self, readinto, count, pace=None):
        _take_body(readinto, count, self.store.buf, self.write, self.raw, pace)

    def write(self, data):
        if self.hasher is not None:
            self.hasher.update(data)

    def finish(self, their_digest, aborted=False):
        if self.failure is not None:
            return self.failure
        if aborted:
            return ST_ABORTED, "%s: the sender gave it up" % _display(self.raw)
        if not hmac.compare_digest(self.hasher.digest(), their_digest):
            return ST_INTEGRITY, "%s: sha256 mismatch" % _display(self.raw)
        return None

    def close(self, keep=False):
        pass


def _take_body(readinto, count, buf, take, raw, pace=None):
    """Read count bytes of a body through buf, handing each piece to take()."""
    view = memoryview(buf)
    while count:
        n = readinto(view[:count] if count < CHUNK else view)
        if not n:
            raise ConnectionClosedError("%s: connection closed with %s still to come"
                                        % (_display(raw), _human(count)))
        take(view[:n])
        count -= n
        if pace is not None:
            pace.check(count)


class _NewDir:
    """A directory made (MKDIR), its answer waiting for the group commit."""
    __slots__ = ("fid", "raw", "parts", "verdict")

    def __init__(self, fid, raw, parts):
        self.fid = fid
        self.raw = raw
        self.parts = parts
        self.verdict = None


class _GroupCommit:
    """The files sealed (and directories made) since the last commit: made
    durable, published and counted together, each exactly once.

    tally is what counts and reports (a Receiver): _wants_info(),
    _count_files(count, size, ...), _count_failure() and _log(line).  The
    counters here are one connection's (SessionInfo).
    """

    def __init__(self, store, tally, peer):
        self.store = store
        self.tally = tally
        self.peer = peer
        self.group = []            # _IncomingFile entries, sealed, not yet published
        self.made = []             # _NewDir entries, likewise
        # Directories whose new entry could not be synced: path -> error.
        # Nothing below them is acknowledged on this connection.
        self.undurable = {}
        self.files = self.bytes = self.skipped = self.failed = self.dirs = 0
        # What a published file's path starts with, where it is that simple.
        self._root = store.dest.root.rstrip("/") + "/" if os.sep == "/" else None

    def hold(self, incoming):
        self.group.append(incoming)

    def hold_dir(self, made):
        self.made.append(made)

    def refusal(self, raw, code, reason):
        """The verdict (code, reason) for a file not stored; a failure is
        counted and logged."""
        if code == ST_SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1
            self.tally._count_failure()
            shown = _display(raw)
            said = reason[len(shown) + 2:] if reason.startswith(shown + ": ") else reason
            self.tally._log("%s: refused %s" % (self.peer, shown + ": " + said if shown
                                                   else said))     # named once
        return code, reason

    def commit(self):
        """Make the held files durable, move them into place and count them.

        Each file's data is made durable (by its seal, or here with one
        syncfs() for the group); all are renamed, then each directory is
        synced once, those renamed into and the parents of the directories
        created since the last commit (MKDIR, or a file's new parents)
        alike: a file or directory is acknowledged only when its data and
        its name, and the names of the new directories on its way, are
        durable, as if it had been finished alone.  Sets each file's and
        directory's verdict, (status, reason).

        The one place a received file is published, so also the one place
        it is counted and reported (on_file), whether its answer is then
        sent or the connection has already failed.  Counted before the
        answer goes out, so the counters include a file by the time its
        sender hears that it arrived.
        """
        group, self.group = self.group, []
        made, self.made = self.made, []
        store, dest = self.store, self.store.dest
        if not group and not made and not dest.created:
            dest.release()
            return
        self._sync_data([held for held in group if held.unsynced])
        published = []
        for held in group:
            if held.failure is not None:          # its data could not be synced
                temp, held.temp = held.temp, None
                dest.remove(held.handle, temp)
                continue
            temp, held.temp = held.temp, None
            try:
                held.final, held.note = store.publish(held.handle, temp, held.parts,
                                                      held.raw, held.existed)
                if held.final is not None:
                    published.append(held)
            except (XferError, OSError) as e:
                held.fail(e)
                dest.remove(held.handle, temp)
        failed_dirs, dir_ids = self._sync_dirs(published)
        counted = []
        undurable = failed_dirs or self.undurable
        for held in group:
            if held.failure is None and undurable:
                error = failed_dirs.get(dir_ids.get(held.handle))
                if error is None:
                    error = self._undurable(held.parts[:-1])
                if error is not None:
                    held.fail(error)
            if held.failure is not None:
                held.verdict = self.refusal(held.raw, *held.failure)
            elif held.final is None:             # the policy said skip after all
                self.skipped += 1
                held.verdict = ST_SKIPPED, held.note
            else:
                held.verdict = ST_OK, held.note
                counted.append(held)
        if counted:
            self._count(counted)
        for directory in made:
            error = self._undurable(directory.parts)
            if error is not None:
                directory.verdict = self.refusal(directory.raw,
                                                 *_failure(directory.raw, error, self.store.side))
            else:
                self.dirs += 1
                directory.verdict = _OK
        dest.release()

    def _count(self, published):
        """Count files just published (and tell of each, if anyone listens)."""
        size = resumed = resumed_bytes = 0
        for held in published:
            held.parts[-1] = held.final
            size += held.size
            if held.resumed:
                resumed += 1
                resumed_bytes += held.resumed
        self.files += len(published)
        self.bytes += size
        tally = self.tally
        infos = []
        if tally._wants_info():
            now, peer, root = time.monotonic(), self.peer, self._root
            for held in published:
                relpath = "/".join(held.parts)
                path = root + relpath if root else self.store.dest.final_path(held.parts)
                infos.append(FileInfo(path, relpath, held.size, peer, now - held.started,
                                      held.digest))
        tally._count_files(len(published), size, resumed, resumed_bytes, infos)

    def _sync_dirs(self, published):
        """Sync each directory once: those files were renamed into and the
        parents of directories created; ({dir_id: error}, {handle: dir_id})."""
        dest = self.store.dest
        dir_ids = {handle: dest.dir_id(handle)
                   for handle in dict.fromkeys(held.handle for held in published)}
        targets = {key: handle for handle, key in dir_ids.items()}
        created = dest.created
        for key, (handle, _) in created.items():
            targets.setdefault(key, handle)
        failed_dirs = {}
        for key, handle in targets.items():
            try:
                self.store.sync("directory", handle)
            except OSError as e:
                failed_dirs[key] = e
        for key, (_, children) in created.items():
            if key in failed_dirs:
                for child in children:
                    self.undurable[child] = failed_dirs[key]
        dest.forget_created()
        return failed_dirs, dir_ids

    def _undurable(self, dirs):
        """The error that kept a directory on the way to dirs from being
        durable, or None."""
        if self.undurable:
            for i in range(1, len(dirs) + 1):
                error = self.undurable.get(tuple(dirs[:i]))
                if error is not None:
                    return error
        return None

    def _sync_data(self, group):
        """Make the data of held files durable: one syncfs() per filesystem."""
        devices, failed = {}, {}        # st_dev -> parent handles; handle -> error
        for handle in dict.fromkeys(held.handle for held in group):
            try:
                devices.setdefault(os.fstat(handle).st_dev, []).append(handle)
            except OSError as e:
                failed[handle] = e
        for handles in devices.values():
            try:
                self.store.sync("filesystem", handles[0])
            except OSError as e:
                failed.update(dict.fromkeys(handles, e))
        for held in group:
            if held.handle in failed:
                held.fail(failed[held.handle])


class _Pace:
    """A body's minimum progress: in every window seconds at least min_bytes
    arrive (or the rest of it), else the connection is dropped.

    The idle timeout alone is reset by every byte, so a sender trickling
    one byte a second would hold its connection (and its thread) for ever.
    """
    __slots__ = ("window", "least", "raw", "mark", "mark_left", "base")

    def __init__(self, receiver, raw, left):
        self.window = receiver.body_window
        self.least = receiver.body_min_bytes
        self.raw = raw
        self.mark = time.monotonic()
        self.mark_left = left
        self.base = 0           # a BATCH: the bytes of its bodies after this one

    def check(self, left):
        """Called after each chunk with the bytes of this body still to come."""
        if not self.window:
            return
        now = time.monotonic()
        if now - self.mark < self.window:
            return
        left += self.base
        got = self.mark_left - left
        if got < min(self.least, self.mark_left):
            raise RemoteError("%s: receiving too slowly: %s in %g s, the receiver needs %s "
                              "per %g s" % (_display(self.raw), _human(got),
                                            round(now - self.mark, 1), _human(self.least),
                                            self.window), ST_TIMEOUT)
        self.mark, self.mark_left = now, left


def _hash_fd(fd, buf):
    """sha256 of a file from its start, read through buf; leaves the offset at the end."""
    h = hashlib.sha256()
    view = memoryview(buf)
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        n = os.readv(fd, [view]) if hasattr(os, "readv") else _read_into(fd, view)
        if not n:
            return h
        h.update(view[:n])


def _read_into(fd, view):
    data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)


def _cut(name, limit):
    """name cut to at most limit UTF-8 bytes, on a character boundary."""
    return name.encode("utf-8")[:limit].decode("utf-8", "ignore")


_NO_SPACE_ERRNOS = frozenset(e for e in (getattr(errno, "ENOSPC", None),
                                         getattr(errno, "EDQUOT", None),
                                         getattr(errno, "EFBIG", None)) if e)

# What a failed system call means, in words its reader does not mistake for
# a problem on another machine; %s is where it failed (_failure's side).
_ERRNO_TEXT = {getattr(errno, name): text for name, text in (
    ("ENOSPC", "no space left on %s's disk"),
    ("EDQUOT", "%s's disk quota is used up"),
    ("EFBIG", "too large for %s's filesystem"),
    ("EACCES", "permission denied on %s"),
    ("EPERM", "permission denied on %s"),
    ("EROFS", "%s's disk is read-only"),
) if hasattr(errno, name)}


def _failure(raw, error, side="the receiver"):
    """(status, reason) for RESULT from an XferError or an OSError about raw.

    The reason always starts with the path, so a sender can tell which of
    many files failed.  side says where an OSError happened: "the receiver"
    (what a push or an upload writes), "the server" (what a get or ls reads
    there), or "this machine" (what a get writes here).
    """
    if isinstance(error, XferError):
        return error.code, str(error)
    code = ST_NO_SPACE if error.errno in _NO_SPACE_ERRNOS else ST_IO
    template = _ERRNO_TEXT.get(error.errno)
    text = template % side if template else "%s on %s" % (error.strerror or error, side)
    return code, "%s: %s" % (_display(raw), text)


def _duration(seconds):
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 0)):
        if seconds >= size:
            n = round(seconds / size, 1) if size else seconds
            return "%g %s%s" % (n, unit, "" if n == 1 else "s")
    return "%g seconds" % seconds


def _human(n):
    """n bytes (or bytes per second) as a person reads them: 999 B, 4.1 KB, 2.6 MB."""
    # Written out, not looped: the server's log says two sizes per file.
    if -1000 < n < 1000:
        return "%d B" % n
    n /= 1000.0
    if -1000 < n < 1000:
        return "%.1f KB" % n
    n /= 1000.0
    if -1000 < n < 1000:
        return "%.1f MB" % n
    n /= 1000.0
    if -1000 < n < 1000:
        return "%.1f GB" % n
    return "%.1f TB" % (n / 1000.0)


# The parts a Receiver builds each connection from (Receiver's docstring),
# named here because they are defined after it.
Receiver._session_class = _ReceiveSession
Receiver._store_class = _Store
Receiver._incoming_class = _IncomingFile
Receiver._commit_class = _GroupCommit


#------------------------------------------------------------
# HTTP on the same port (README "HTTP API", Protocol 9)
#------------------------------------------------------------
# A connection whose first byte is an HTTP method's (an uppercase letter
# other than the preface's X) is handed by its _ReceiveSession to an
# _HttpConnection: requests, one after another (keep-alive), each with a
# head read against a deadline and a body paced like an xfer body.  What an
# upload brings ends in the receiving parts above, as a push does:
#
#   PUT /api/files/PATH     one _IncomingFile in the connection's _Store,
#                           published by its _GroupCommit
#   POST /api/uploads, then PUT /api/uploads/ID?offset=K per chunk
#                           an _Upload: a _Store, _GroupCommit and resumable
#                           partial of its own, kept by the _WebState between
#                           the requests (and connections) bringing its chunks
#
# and GET reads DIR through the session's _served, as GET and LIST do.

# Reasons of the status codes this server sends.
_HTTP_REASONS = {
    100: "Continue", 200: "OK", 201: "Created", 204: "No Content", 206: "Partial Content",
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
    411: "Length Required", 413: "Content Too Large", 414: "URI Too Long",
    416: "Range Not Satisfiable", 421: "Misdirected Request", 422: "Unprocessable Content",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
    507: "Insufficient Storage",
}
_HTTP_COOKIE = "xfer_session"
# What every JSON answer carries; the page adds its Content-Security-Policy.
_HTTP_JSON_HEADERS = (("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                      ("X-Content-Type-Options", "nosniff"))
_HTTP_PAGE_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"), ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'self' 'unsafe-inline'; "
     "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
     "form-action 'self'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"))
_HTTP_HEAD_END = re.compile(rb"\n\r?\n")
# How a request starts: a method, a space, a path; or as much of that as has
# arrived.  A connection that starts otherwise is not HTTP (ssh, a scanner).
_HTTP_START = re.compile(rb"[A-Z]{1,16}(?: (?:/|\Z)|\Z)")
_HTTP_METHOD = re.compile(r"[A-Z]{1,16}\Z")
_HTTP_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
_HTTP_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}\Z")
_HTTP_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")
_HTTP_SECONDS = re.compile(r"(-?)(\d{1,10})(?:\.(\d*))?\Z")
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
           "Dec")


def _http_method_byte(byte):
    """True if a connection's first byte starts an HTTP method (not the preface's X)."""
    return byte is not None and 0x41 <= byte <= 0x5A and byte != MAGIC[0]


def _http_plain_answer(code, status, reason):
    """A whole JSON answer that ends its connection, for a request not parsed."""
    body = json.dumps({"error": reason, "status": _STATUS_BY_CODE[status].name}).encode()
    return ("HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            "Connection: close\r\n\r\n" % (code, _HTTP_REASONS[code], len(body))
            ).encode("latin-1") + body


def _http_tls_refusal(sock):
    """The plain answer to plain HTTP on a TLS server: use https."""
    try:
        sock.settimeout(1.0)
        sock.recv(HTTP_LINE_MAX)            # the request, so closing sends no reset
        host, port = sock.getsockname()[:2]
    except OSError:
        host, port = "HOST", DEFAULT_PORT
    return _http_plain_answer(403, ST_TLS_REQUIRED, "this server speaks HTTPS only: open "
                              "https://%s/" % _host_port_text(host, port))


def _http_date(seconds):
    """An HTTP date (RFC 9110 5.6.7), in English whatever the locale."""
    t = time.gmtime(seconds)
    return "%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _WEEKDAYS[t.tm_wday], t.tm_mday, _MONTHS[t.tm_mon - 1], t.tm_year, t.tm_hour,
        t.tm_min, t.tm_sec)


def _http_unquote(text):
    """The bytes a percent-encoded URL path stands for; ValueError if malformed."""
    raw = text.encode("latin-1")
    if b"%" not in raw:
        return raw
    pieces = raw.split(b"%")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if len(piece) < 2 or not all(c in b"0123456789abcdefABCDEF" for c in piece[:2]):
            raise ValueError("a '%' not followed by two hex digits")
        out.append(bytes([int(piece[:2], 16)]) + piece[2:])
    return b"".join(out)


def _http_quote(name):
    """name percent-encoded for Content-Disposition's filename* (RFC 8187)."""
    return "".join(chr(b) if chr(b).isalnum() and b < 0x80 or chr(b) in "!#$&+-.^_`|~"
                   else "%%%02X" % b for b in name.encode("utf-8", "surrogateescape"))


def _http_attachment(name):
    """Content-Disposition for a download saved as name: filename* (RFC 8187)
    for browsers, and an ASCII filename= beside it for clients that read
    only that one (curl -OJ), as RFC 6266 advises."""
    plain = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    return "attachment; filename=\"%s\"; filename*=UTF-8''%s" % (plain, _http_quote(name))


def _seconds_ns(text):
    """Nanoseconds of a time in seconds written in decimal (X-Mtime, JSON mtime),
    exactly; ValueError if it is not one within 10 000 000 000 s of 1970."""
    match = _HTTP_SECONDS.match(text.strip())
    if match is None:
        value = float(text)
        if not math.isfinite(value) or abs(value) >= 1e10:
            raise ValueError("not a time in seconds")
        return int(round(value * 1e9))
    sign, whole, fraction = match.groups()
    ns = int(whole) * 10**9 + int((fraction or "")[:9].ljust(9, "0"))
    return -ns if sign else ns


def _http_range(text, size):
    """(first, last) byte of a single "bytes=" range; None to ignore it (not
    one this server serves: several ranges, malformed), "unsatisfiable"."""
    match = _HTTP_RANGE.match(text.replace(" ", ""))
    if match is None:
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        count = int(last)
        if not count or not size:
            return "unsatisfiable"
        return max(0, size - count), size - 1
    first = int(first)
    last = int(last) if last else size - 1
    if first >= size:
        return "unsatisfiable"
    if last < first:
        return None
    return first, min(last, size - 1)


class _JsonFloat(str):
    """A JSON number with a fraction, kept as written (an mtime, exactly)."""


class _HttpError(Exception):
    """A request refused: the HTTP code, the status (ST_*) and the reason of
    its JSON answer, and more fields of it.  http None: the status's own
    (_STATUSES).  logged: say it in the server's log (the upload refusals
    are logged by the group commit, as a push's are)."""

    #: (method, path) of a request refused as its head is read
    request_line = None

    def __init__(self, status, reason, http=None, extra=None, headers=(), logged=False):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.http = http or _STATUS_BY_CODE[status].http
        self.extra = extra or {}
        self.headers = tuple(headers)
        self.logged = logged

    @classmethod
    def of(cls, raw, error, **kw):
        """From an XferError or an OSError about raw (_failure)."""
        return cls(*_failure(raw, error), **kw)


class _HttpCut(Exception):
    """Close the connection now, without a last byte (a body given up)."""


class _HttpRequest:
    """One request's head, parsed; unread counts the body bytes still to come."""
    __slots__ = ("method", "target", "path", "query", "version", "headers", "length",
                 "unread", "keep_alive", "expect", "continued", "bearer")

    def __init__(self, head):
        lines = head.decode("latin-1").split("\n")
        parts = lines[0].rstrip("\r").split(" ")
        if len(parts) != 3 or not _HTTP_METHOD.match(parts[0]):
            raise _HttpError(ST_PROTOCOL, "not an HTTP/1.1 request line")
        self.method, self.target, self.version = parts
        if self.version not in ("HTTP/1.1", "HTTP/1.0"):
            if self.version.startswith("HTTP/"):
                raise _HttpError(ST_VERSION, "%s is not served here: HTTP/1.1 is"
                                 % _display(self.version, 20))
            raise _HttpError(ST_PROTOCOL, "not an HTTP/1.1 request line")
        if not self.target.startswith("/"):
            raise _HttpError(ST_PROTOCOL, "the request target must be a path")
        self.path, _, query = self.target.partition("?")
        self.query = dict(item.partition("=")[::2] for item in query.split("&") if item)
        try:
            self._parse_headers(lines)
        except _HttpError as e:
            e.request_line = (self.method, self.path)     # for its log line
            raise

    def _parse_headers(self, lines):
        headers = self.headers = {}
        count = 0
        for line in lines[1:]:
            line = line.rstrip("\r")
            if not line:
                continue
            if line[0] in " \t":
                raise _HttpError(ST_PROTOCOL, "folded header lines are not accepted")
            name, colon, value = line.partition(":")
            if not colon or not _HTTP_HEADER_NAME.match(name):
                raise _HttpError(ST_PROTOCOL, "malformed header line")
            count += 1
            if count > HTTP_HEADER_COUNT_MAX:
                raise _HttpError(ST_PROTOCOL, "more than %d header lines"
                                 % HTTP_HEADER_COUNT_MAX, 431)
            name, value = name.lower(), value.strip(" \t")
            if name in headers:
                if name in ("content-length", "host", "authorization", "origin"):
                    raise _HttpError(ST_PROTOCOL, "two %s headers" % name)
                value = headers[name] + ", " + value
            headers[name] = value
        if "transfer-encoding" in headers:
            raise _HttpError(ST_PROTOCOL, "a body needs a Content-Length (no Transfer-Encoding)",
                             411)
        length = headers.get("content-length")
        if length is not None:
            if not _ascii_digits(length) or len(length) > 19:
                raise _HttpError(ST_PROTOCOL, "malformed Content-Length")
            length = int(length)
        self.length = length
        self.unread = length or 0
        connection = headers.get("connection", "").lower()
        self.keep_alive = ("close" not in connection if self.version == "HTTP/1.1"
                           else "keep-alive" in connection)
        self.expect = headers.get("expect", "").lower() == "100-continue"
        self.continued = False
        self.bearer = False


_NO_UPLOAD = ("no such upload (finished, cancelled or expired): start it again with "
              "POST /api/uploads")


class _WebState:
    """What a Receiver keeps for HTTP between requests: the names its Host
    header may carry, the logged-in sessions, and the chunked uploads."""

    def __init__(self, receiver):
        self.r = receiver
        self.lock = threading.Lock()
        names = {"localhost"}
        for name in (socket.gethostname(), receiver.name):
            name = (name or "").lower().rstrip(".")
            if name:
                names.update((name, name.split(".")[0]))
        self.names = names | {name + ".local" for name in names if name != "localhost"}
        self.sessions = collections.OrderedDict()      # cookie -> expiry (monotonic)
        self.uploads = collections.OrderedDict()       # id -> _Upload, least recent first
        self.by_key = {}                               # (path, size, mtime_ns) -> _Upload
        self.starting = {}                             # key -> Event, while one is opened
        self.closed = False

    # -- the Host header (DNS rebinding)

    def host_allowed(self, host):
        host = host.strip().lower()
        if host.startswith("["):
            literal, bracket, port = host[1:].partition("]")
            if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
                return False
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                return False
            return True
        name, colon, port = host.rpartition(":")
        if not colon:
            name = host
        elif not port.isdigit():
            return False
        name = name.rstrip(".")
        if name in self.names:
            return True
        try:
            ipaddress.IPv4Address(name)
        except ValueError:
            return False
        return True

    # -- sessions

    def login(self):
        cookie = self.r._secrets.token_urlsafe(32)
        with self.lock:
            self.sessions[cookie] = time.monotonic() + HTTP_SESSION_AGE
            while len(self.sessions) > HTTP_SESSIONS_MAX:
                self.sessions.popitem(last=False)
        return cookie

    def logout(self, cookie):
        with self.lock:
            self.sessions.pop(cookie, None)

    def logged_in(self, cookie):
        if not cookie:
            return False
        with self.lock:
            expiry = self.sessions.get(cookie)
            if expiry is None:
                return False
            if expiry <= time.monotonic():
                del self.sessions[cookie]
                return False
            return True

    # -- chunked uploads

    def start_upload(self, key, raw, size, mtime_ns, digest, peer, ended):
        """The upload of key: the one open, or a new one (admitted by the
        store: path, limits, space, policy); (HTTP code, answer).  An empty
        file is published at once: its commit is added to the list ended."""
        while True:
            with self.lock:
                if self.closed:
                    raise _HttpError(ST_SHUTDOWN, "the server is shutting down")
                upload = self.by_key.get(key)
                if upload is not None:
                    upload.last = time.monotonic()
                    self.uploads.move_to_end(upload.id)
                    return 200, {"upload": upload.id, "offset": upload.offset}
                waiting = self.starting.get(key)
                if waiting is None:
                    self._make_room()
                    self.starting[key] = threading.Event()
                    break
            # Another request is opening this very upload: its answer is ours.
            waiting.wait(self.r.idle_timeout)
        upload = _Upload(self.r, key, raw, size, mtime_ns, digest, peer)
        try:
            answer = upload.open()
            with self.lock:
                if answer is None:
                    self.uploads[upload.id] = upload
                    self.by_key[key] = upload
        except BaseException:
            upload.close(keep=True)
            raise
        finally:
            with self.lock:
                self.starting.pop(key).set()
        if answer is not None:            # published at once (size 0)
            upload.close()
            ended.append(upload.commit)
            return answer
        return 200, {"upload": upload.id, "offset": upload.offset}

    def _make_room(self):
        """Close uploads silent too long, and the least recent if full (under lock)."""
        now = time.monotonic()
        for upload in list(self.uploads.values()):
            if now - upload.last < HTTP_UPLOAD_IDLE and len(self.uploads) < HTTP_UPLOADS_MAX:
                break
            if upload.lock.acquire(blocking=False):
                try:
                    self._drop(upload)
                    upload.close(keep=True)
                finally:
                    upload.lock.release()
        if len(self.uploads) >= HTTP_UPLOADS_MAX:
            raise _HttpError(ST_BUSY, "%d uploads are already in progress" % HTTP_UPLOADS_MAX,
                             headers=[("Retry-After", "10")])

    def _drop(self, upload):
        if self.uploads.get(upload.id) is upload:
            del self.uploads[upload.id]
            del self.by_key[upload.key]

    def upload(self, uid):
        with self.lock:
            upload = self.uploads.get(uid)
            if upload is not None:
                upload.last = time.monotonic()
                self.uploads.move_to_end(uid)
        if upload is None:
            raise _HttpError(ST_BAD_PATH, _NO_UPLOAD, 404)
        return upload

    def forget(self, upload):
        with self.lock:
            self._drop(upload)

    def close(self):
        """The server stops: every upload closed, its partial kept for a resume."""
        with self.lock:
            self.closed = True
            uploads = list(self.uploads.values())
            self.uploads.clear()
            self.by_key.clear()
        for upload in uploads:
            if upload.lock.acquire(timeout=1.0):
                try:
                    upload.close(keep=True)
                finally:
                    upload.lock.release()


class _Upload:
    """One chunked upload between its requests: an _IncomingFile writing a
    resumable partial of its own store, verified chunk by chunk, published
    by its own group commit once the last chunk is in.

    offset is how many bytes are verified and written: a chunk that fails its
    digest, or is cut off, is cut off the partial again.  It is the claimant
    of its partial (Receiver._claim); lock is held while a request uses it.
    """

    def __init__(self, receiver, key, raw, size, mtime_ns, digest, peer):
        self.r = receiver
        self.key = key
        self.raw = raw
        self.size = size
        self.mtime_ns = mtime_ns
        self.digest = digest            # of the whole file, if the page gave it
        self.id = receiver._secrets.token_hex(12)
        self.lock = threading.Lock()
        self.last = time.monotonic()
        self.store, self.commit = receiver._receiving(self, peer)
        self.store.partial_key = "\0http\0%d\0%d" % (size, mtime_ns)
        self.incoming = None
        self.offset = 0

    # -- the claims of its store (Receiver._claim)

    def claim(self, key):
        return self.r._claim(key, self)

    def unclaim(self, key):
        self.r._unclaim(key)

    def silent_for(self):
        return 0.0 if self.lock.locked() else time.monotonic() - self.last

    def cut(self):
        pass        # nothing to cut between requests; it lets go when closed

    # -- its life

    def open(self):
        """Admit it and open (or resume) its partial; None, or the answer of
        a file published at once (size 0)."""
        incoming = self.r._incoming_class(self.store, 0, self.raw, self.size, self.mtime_ns,
                                          0o644, stream=False)
        try:
            incoming.admit(resumable=True)
        except (XferError, OSError) as e:
            raise _HttpError.of(self.raw, e) from None
        self.incoming = incoming
        offset = incoming.offset
        if offset % HTTP_CHUNK:
            # Kept across a restart, a partial may end in a chunk written but
            # never verified: only whole chunks are taken.
            offset -= offset % HTTP_CHUNK
            os.ftruncate(incoming.fd, offset)
            incoming.hasher = _hash_fd(incoming.fd, self.store.buf) if offset else None
        incoming.begin(offset)
        self.offset = offset
        if not self.size:
            return self._publish()
        return None

    def chunk(self, conn, request, offset):
        """One PUT of a chunk at offset: (HTTP code, answer)."""
        if offset != self.offset:
            raise _HttpError(ST_CONFLICT, "%s: the upload is at byte %d, not %d"
                             % (_display(self.raw), self.offset, offset),
                             extra={"offset": self.offset})
        n = request.length
        if n is None:
            raise _HttpError(ST_PROTOCOL, "a chunk needs a Content-Length", 411)
        if n > HTTP_CHUNK:
            raise _HttpError(ST_TOO_LARGE, "a chunk of %d bytes is over the %d this server "
                             "takes" % (n, HTTP_CHUNK))
        if not n or offset + n > self.size:
            raise _HttpError(ST_PROTOCOL, "a chunk of %d bytes at %d of a file of %d"
                             % (n, offset, self.size))
        want = conn.digest_header(request, "X-Chunk-SHA256")
        if want is None:
            raise _HttpError(ST_PROTOCOL, "a chunk needs its X-Chunk-SHA256")
        incoming = self.incoming
        before = incoming.hasher.copy()
        digest = hashlib.sha256()
        readinto = conn.rfile.readinto

        def hashed_readinto(view):
            got = readinto(view)
            digest.update(view[:got])
            return got
        conn.go_on(request)
        try:
            incoming.receive(hashed_readinto, n, _Pace(self.r, self.raw, n))
        except BaseException:
            self._take_back(before)
            raise
        request.unread = 0
        error = incoming.write_error
        if error is not None or not hmac.compare_digest(digest.digest(), want):
            self._take_back(before)
            if error is not None:       # the receiver's disk: its operator must hear of it
                raise _HttpError.of(self.raw, error, logged=True)
            raise _HttpError(ST_INTEGRITY, "%s: the chunk at byte %d does not match its "
                             "X-Chunk-SHA256; dropped" % (_display(self.raw), offset),
                             extra={"offset": offset}, logged=True)
        self.offset = offset + n
        if self.offset < self.size:
            return 200, {"offset": self.offset}
        return self._publish()

    def _take_back(self, hasher):
        """Cut a chunk that failed off the partial again: offset stays."""
        incoming = self.incoming
        incoming.hasher = hasher
        incoming.write_error = None
        try:
            os.ftruncate(incoming.fd, self.offset)
            os.lseek(incoming.fd, self.offset, os.SEEK_SET)
        except OSError:
            self.r._web.forget(self)
            self.close(keep=False)
            raise

    def _publish(self):
        """The last byte is in: verify, seal, publish through the group commit."""
        incoming, self.incoming = self.incoming, None
        self.r._web.forget(self)
        try:
            failure = incoming.finish(self.digest or incoming.hasher.digest())
            if failure is not None:
                self.commit.refusal(self.raw, *failure)
                raise _HttpError(*failure)
            return _http_published(incoming, self.commit)
        finally:
            self.store.close()

    def cancel(self):
        self.r._web.forget(self)
        self.close(keep=False)

    def close(self, keep=True):
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.close(keep=keep)
        self.store.close()


def _http_published(incoming, commit):
    """Publish a sealed file through commit (counted and reported there, once);
    (HTTP code, answer)."""
    commit.hold(incoming)
    commit.commit()
    incoming.close()
    if incoming.failure is not None:
        raise _HttpError(*incoming.failure)
    if incoming.final is None:
        return _STATUS_BY_CODE[ST_SKIPPED].http, {
            "path": incoming.raw.decode("utf-8"), "skipped": True, "note": incoming.note}
    return _STATUS_BY_CODE[ST_OK].http, {"path": "/".join(incoming.parts), "size": incoming.size,
                                         "sha256": incoming.digest, "note": incoming.note}


class _HttpBody:
    """A response body in HTTP/1.1 chunks, small writes gathered (about
    _GATHER bytes a chunk); a file object for zipfile, which never seeks it."""

    def __init__(self, sock):
        self.sock = sock
        self.parts = []
        self.size = 0

    def write(self, data):
        n = len(data)
        if n >= _GATHER:
            self.flush()
            self.sock.sendall(b"%x\r\n" % n)
            self.sock.sendall(data)
            self.sock.sendall(b"\r\n")
        elif n:
            self.parts.append(bytes(data))
            self.size += n
            if self.size >= _GATHER:
                self.flush()
        return n

    def flush(self):
        if self.size:
            data, self.parts, self.size = b"".join(self.parts), [], 0
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def close(self):
        """The last chunk: the body is complete."""
        self.flush()
        self.sock.sendall(b"0\r\n\r\n")


class _HttpConnection:
    """One HTTP connection: its requests in turn, until it closes, falls
    silent, or a request ends it (Connection: close, an error that leaves
    its body unread).  Runs on the connection's thread inside its
    _ReceiveSession, whose store and group commit a one-shot upload uses."""

    def __init__(self, session):
        self.s = session
        self.r = session.r
        self.web = session.r._web
        self.sock = session.sock
        self.rfile = session.rfile
        self.tls = session.sock is not session.raw_sock
        self.peer = session.peer
        self.address = session.address

    def run(self):
        deadline = self.s.started + self.r.handshake_timeout
        request = None
        first = True
        try:
            while True:
                request = None
                try:
                    request = _HttpRequest(self._read_head(deadline, first))
                    first = False
                    self.head_only = request.method == "HEAD"
                    self.sock.settimeout(self.r.idle_timeout)
                    keep = self._answer(request)
                except _HttpError as e:
                    keep = self._refuse(e, request)
                if not keep or self.r._stopping or not self._next_request():
                    self.s.clean = True
                    return
                deadline = time.monotonic() + self.r.handshake_timeout
        except (_HttpCut, _Drop):
            self.s.clean = True       # it was answered, then closed
            return
        except socket.timeout:
            if request is None:
                self.r._log("%s: dropped: HTTP request head not finished within %g s"
                            % (self.peer, self.r.handshake_timeout))
            else:
                self.r._log("%s: dropped: silent for %ss" % (self.peer, self.r.idle_timeout))
        except XferError as e:        # a body too slow, or cut off
            self.r._log("%s: dropped: %s" % (self.peer, e))
            if e.code == ST_TIMEOUT:  # the client may still be listening
                try:
                    self._refuse(_HttpError(ST_TIMEOUT, str(e)), None)
                except (_HttpCut, OSError):
                    pass
        except OSError:               # gone: a browser closes what it no longer needs
            self.s.clean = request is None

    def _next_request(self):
        """Wait for the next request's first byte (idle timeout); False to close.
        Looks every quarter second whether the server is stopping."""
        deadline = time.monotonic() + self.r.http_keep_alive
        while not self.rfile.ready(0.25):
            if self.r._stopping or time.monotonic() > deadline:
                return False
        return self.rfile.peek() is not None

    def _read_head(self, deadline, first=False):
        """The request line and headers, within their limits and by deadline
        (socket.timeout after it).  first: the connection's first request,
        dropped as "not an xfer client" if it does not start as HTTP does."""
        rfile = self.rfile
        while True:
            buf, start, end = rfile.buf, rfile.start, rfile.end
            if first and not _HTTP_START.match(buf, start, min(end, start + 18)):
                self.r._log("%s: refused: not an xfer client (first bytes %r)"
                            % (self.peer, bytes(buf[start:min(end, start + 8)])))
                raise _Drop()
            line_end = buf.find(b"\n", start, end)
            if (line_end if line_end >= 0 else end) - start > HTTP_LINE_MAX + 1:
                raise _HttpError(ST_PROTOCOL, "request line over %d bytes" % HTTP_LINE_MAX,
                                 414)
            if line_end >= 0:
                found = _HTTP_HEAD_END.search(buf, line_end, end)
                stop = end if found is None else found.end()
                if stop - line_end > HTTP_HEADERS_MAX + 2:
                    raise _HttpError(ST_PROTOCOL, "headers over %d bytes" % HTTP_HEADERS_MAX,
                                     431)
                if found is not None:
                    rfile.start = stop
                    return bytes(buf[start:stop])
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout()
            self.sock.settimeout(left)
            if not rfile._fill(HTTP_LINE_MAX + HTTP_HEADERS_MAX + 4):
                raise _Drop()

    # -- answers

    def _send_head(self, code, headers=(), length=None, close=False):
        lines = ["HTTP/1.1 %d %s" % (code, _HTTP_REASONS.get(code, "Error"))]
        lines.extend("%s: %s" % header for header in headers)
        if length is None:
            lines.append("Transfer-Encoding: chunked")
        elif code != 204:
            lines.append("Content-Length: %d" % length)
        if close:
            lines.append("Connection: close")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    head_only = False           # the request is a HEAD: its answer has no body

    def _send(self, code, body=b"", headers=_HTTP_JSON_HEADERS, close=False):
        if isinstance(body, dict):
            body = json.dumps(body).encode("utf-8")
        self._send_head(code, headers, len(body), close)
        if body and not self.head_only:
            self.sock.sendall(body)

    def _refuse(self, error, request):
        """Answer a refusal; True if the connection goes on."""
        if error.logged or error.status == ST_PROTOCOL or error.http in (403, 421):
            line = error.request_line if request is None else (request.method, request.path)
            what = "" if line is None else " %s %s" % (line[0], _display(line[1], 100))
            self.r._log("%s: refused HTTP%s: %s" % (self.peer, what, error.reason))
        keep = request is not None and request.keep_alive
        if keep and request.unread:
            # Unread, a body would be taken for the next request: read it
            # if small (and coming), else close after the answer.
            if request.unread > HTTP_DRAIN_MAX or (request.expect and not request.continued):
                keep = False
            else:
                self._drop_body(b"", request.unread)
                request.unread = 0
        body = {"error": error.reason, "status": _STATUS_BY_CODE[error.status].name}
        body.update(error.extra)
        self._send(error.http, body, _HTTP_JSON_HEADERS + error.headers, close=not keep)
        if not keep:
            self._linger()
        return keep

    def _drop_body(self, raw, count):
        """Read a refused request's body and drop it, as a refused push's is."""
        _Drain(self.s.store, raw, (ST_IO, "refused")).receive(
            self.rfile.readinto, count, _Pace(self.r, raw, count))

    def _linger(self):
        """After a last answer: let the client read it before the close, which
        with its request unread would reset the connection and lose it."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(1.0)
            left = HTTP_DRAIN_MAX * 16
            while left > 0:
                n = self.sock.recv_into(self.s.buf)
                if not n:
                    break
                left -= n
        except (OSError, ValueError):
            pass
        raise _HttpCut()

    def go_on(self, request):
        """The body is wanted: answer Expect: 100-continue."""
        if request.expect and not request.continued:
            request.continued = True
            self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- checks

    def _check_origin(self, request):
        """CSRF (README "Security"): a request from another site is refused."""
        headers = request.headers
        origin = headers.get("origin")
        if origin is not None:
            own = "%s://%s" % ("https" if self.tls else "http", headers.get("host", ""))
            if origin.lower() != own.lower():
                raise _HttpError(ST_DENIED, "a request from another site (Origin %s)"
                                 % _display(origin, 100))
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in ("same-origin", "none"):
            raise _HttpError(ST_DENIED, "a request from another site (Sec-Fetch-Site %s)"
                             % _display(site, 40))

    def _judge(self, right, what="token", detail="", wrong=None):
        """A secret checked against the address's back-off (_AuthGuard)."""
        verdict = self.r._auth.check(self.address, self.peer, right, what, detail)
        if verdict is None:
            raise _HttpError(ST_AUTH_FAILED, wrong or "wrong %s" % what)
        if verdict:
            self._backing_off(verdict)

    def _backing_off(self, wait):
        raise _HttpError(ST_BUSY, self.r._auth.refusal(self.address, wait),
                         headers=[("Retry-After", "%d" % math.ceil(wait))])

    def _logged_in(self, request):
        """True with no token, the right Bearer token or a session cookie;
        a wrong Bearer token counts against the address."""
        token = self.r.token
        if not token:
            return True
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            if scheme.lower() == "bearer":
                given = value.strip().encode("latin-1")
                self._judge(lambda: hmac.compare_digest(given, token.encode("utf-8")))
                request.bearer = True
                return True
        return self.web.logged_in(self._cookie(request))

    @staticmethod
    def _cookie(request):
        for item in request.headers.get("cookie", "").split(";"):
            name, _, value = item.strip().partition("=")
            if name == _HTTP_COOKIE:
                return value
        return None

    def _require_login(self, request):
        if not self._logged_in(request):
            raise _HttpError(ST_AUTH_FAILED, "log in first (POST /api/login), or send "
                             "Authorization: Bearer TOKEN")

    def _require_get(self):
        if not self.r.allow_get:
            raise _HttpError(ST_DENIED, "this server does not let clients read its directory: "
                             "start it with serve --allow-get (or allow_get = yes in [serve])")

    def digest_header(self, request, name):
        """The digest in header name (as the README spells it), or None."""
        value = request.headers.get(name.lower())
        if value is None:
            return None
        if not _HTTP_HEX_DIGEST.match(value):
            raise _HttpError(ST_PROTOCOL, "%s is not 64 hex digits" % name)
        return bytes.fromhex(value)

    def _json_body(self, request):
        if request.length is None:
            raise _HttpError(ST_PROTOCOL, "a JSON body needs a Content-Length", 411)
        if request.length > HTTP_JSON_MAX:
            raise _HttpError(ST_TOO_LARGE, "a JSON body of %d bytes is over %d"
                             % (request.length, HTTP_JSON_MAX))
        self.go_on(request)
        data = _recv_exact(self.rfile, request.length)
        request.unread = 0
        try:
            body = json.loads(data.decode("utf-8"), parse_float=_JsonFloat)
        except (ValueError, RecursionError):     # [[[[... nested past the stack
            body = None
        if not isinstance(body, dict):
            raise _HttpError(ST_PROTOCOL, "the body is not a JSON object")
        return body

    # -- routes

    def _answer(self, request):
        """Check and route one request; True if the connection goes on."""
        host = request.headers.get("host")
        if host is None:
            raise _HttpError(ST_PROTOCOL, "no Host header")
        if not self.web.host_allowed(host):
            raise _HttpError(ST_DENIED, "Host %s is not a name of this server (open it by its "
                             "address or host name)" % _display(host, 100), 421)
        method, path = request.method, request.path
        if method == "OPTIONS":
            raise _HttpError(ST_DENIED, "cross-origin requests are not served")
        if path == "/":
            if method != "GET":
                raise _HttpError(ST_PROTOCOL, "%s of the page" % method, 405)
            self._send(200, _PAGE.encode("utf-8"), _HTTP_PAGE_HEADERS)
            return request.keep_alive
        if not path.startswith("/api/"):
            raise _HttpError(ST_BAD_PATH, "no such page", 404)
        self._check_origin(request)
        if method in ("POST", "PUT", "DELETE"):
            # A browser adds no Authorization header by itself, and a page of
            # another origin can add one only after a preflight (refused).
            if request.headers.get("authorization", "")[:7].lower() == "bearer ":
                if self.r.token:
                    self._require_login(request)  # checked here: it stands for X-Xfer
            elif request.headers.get("x-xfer") != "1":
                raise _HttpError(ST_DENIED, "a request that changes something needs the "
                                 "header X-Xfer: 1 (or Authorization: Bearer TOKEN)")
        route, _, rest = path[len("/api/"):].partition("/")
        handler = self._ROUTES.get((method, route))
        if handler is None:
            if any(known == route for _, known in self._ROUTES):
                raise _HttpError(ST_PROTOCOL, "%s is not served for /api/%s"
                                 % (method, route), 405)
            raise _HttpError(ST_BAD_PATH, "no such API", 404)
        try:
            raw = _http_unquote(rest)
        except ValueError as e:
            raise _HttpError(ST_BAD_PATH, "malformed path: %s" % e) from None
        if route not in ("session", "login"):
            self._require_login(request)
        answer = handler(self, request, raw)
        if answer is not None:
            code, body = answer
            extra = ()
            if isinstance(body, tuple):
                body, extra = body
            self._send(code, body, (_HTTP_JSON_HEADERS if body or code != 204 else ()) + extra)
        if request.unread:              # a body the route had no use for
            if request.unread > HTTP_DRAIN_MAX or (request.expect and not request.continued):
                self._linger()
            self._drop_body(raw, request.unread)
        return request.keep_alive

    def _session_info(self, request, raw):
        try:
            logged_in = self._logged_in(request)
        except _HttpError as e:
            if e.status != ST_AUTH_FAILED:
                raise
            logged_in = False
        r = self.r
        return 200, {"logged_in": logged_in, "auth": bool(r.token), "name": r.name,
                     "version": __version__, "allow_get": bool(r.allow_get),
                     "max_size": r.max_size, "chunk": HTTP_CHUNK}

    def _login(self, request, raw):
        """POST /api/login: the token or the open pairing code, judged as a
        pairing's or a handshake's is (tries, back-off); a right code stays open."""
        secret = self._json_body(request).get("secret")
        if not isinstance(secret, str) or not secret.strip():
            raise _HttpError(ST_PROTOCOL, 'the body needs "secret": the pairing code or the '
                             'token')
        secret = secret.strip()
        try:
            secret.encode("utf-8")      # JSON may escape a lone surrogate: "\ud800"
        except UnicodeEncodeError:
            raise _HttpError(ST_PROTOCOL, '"secret" is not UTF-8 text') from None
        token = self.r.token
        if token:
            try:
                code = _normalize_code(secret)
            except ConfigError:
                code = None
            if code is None or hmac.compare_digest(secret.encode("utf-8"),
                                                   token.encode("utf-8")):
                self._judge(lambda: hmac.compare_digest(secret.encode("utf-8"),
                                                        token.encode("utf-8")),
                            wrong="wrong token or pairing code")
            else:
                self._login_code(code)
        cookie = "%s=%s; HttpOnly; SameSite=Strict; Path=/; Max-Age=%d%s" % (
            _HTTP_COOKIE, self.web.login(), HTTP_SESSION_AGE, "; Secure" if self.tls else "")
        return 204, (b"", (("Set-Cookie", cookie), ("Cache-Control", "no-store")))

    def _login_code(self, code):
        wait = self.r._auth.wait(self.address, count=True)
        if wait:
            self._backing_off(wait)
        pairing = self.r._pairing
        try:
            serial, w, left = pairing.begin()
        except AuthError as e:
            self.r._log("%s: refused web login: %s" % (self.peer, e))
            raise _HttpError(ST_AUTH_FAILED, str(e)) from None
        right = _code_scalar(code) == w       # outside the guard's lock: PBKDF2 takes a while
        try:
            self._judge(lambda: right, "pairing code", " (%d %s left)"
                        % (left, "try" if left == 1 else "tries"))
        except _HttpError as e:
            if e.status == ST_AUTH_FAILED:
                pairing.failed(serial)
            raise
        pairing.refund(serial)
        self.r._note("%s: logged in to the web page with the pairing code" % self.peer)

    def _logout(self, request, raw):
        self.web.logout(self._cookie(request))
        return 204, (b"", (("Set-Cookie", "%s=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
                            % _HTTP_COOKIE),))

    def _put_file(self, request, raw):
        """PUT /api/files/PATH: the body is the file, into the store as a push's."""
        length = request.length
        if length is None:
            raise _HttpError(ST_PROTOCOL, "an upload needs a Content-Length", 411)
        # Taken as the whole file, a part would replace what is stored; curl
        # -C - -T names a whole file "bytes 0-9/10".
        said = request.headers.get("content-range")
        if said is not None and said.replace(" ", "") != "bytes0-%d/%d" % (length - 1, length):
            raise _HttpError(ST_PROTOCOL, "PUT /api/files takes a whole file, not a "
                             "Content-Range; to go on from a part, use POST /api/uploads")
        digest = self.digest_header(request, "X-Content-SHA256")
        try:
            mtime_ns = _seconds_ns(request.headers["x-mtime"]) \
                if "x-mtime" in request.headers else time.time_ns()
        except ValueError:
            raise _HttpError(ST_PROTOCOL, "X-Mtime is not a time in seconds") from None
        commit = self.s.commit
        incoming = self.s.incoming_class(self.s.store, 0, raw, length, mtime_ns, 0o644,
                                         stream=False)
        try:
            incoming.admit()
        except (XferError, OSError) as e:
            code, reason = _failure(raw, e)
            commit.refusal(raw, code, reason)        # counted and logged as a push's
            if code == ST_SKIPPED:
                return self._skipped(request, raw, reason)
            raise _HttpError(code, reason) from None
        self.go_on(request)
        try:
            incoming.begin(0)
            incoming.receive(self.rfile.readinto, length, _Pace(self.r, raw, length))
            request.unread = 0
            failure = incoming.finish(digest or incoming.hasher.digest())
        except BaseException:
            incoming.close()
            raise
        if failure is not None:
            commit.refusal(raw, *failure)
            raise _HttpError(*failure)
        return _http_published(incoming, commit)

    def _skipped(self, request, raw, reason):
        if request.unread:
            if request.unread > HTTP_DRAIN_MAX or (request.expect and not request.continued):
                request.keep_alive = False
            else:
                self._drop_body(raw, request.unread)
                request.unread = 0
        body = {"path": raw.decode("utf-8"), "skipped": True, "note": reason}
        if not request.keep_alive:
            self._send(200, body, close=True)
            self._linger()
        return 200, body

    def _start_upload(self, request, raw):
        """POST /api/uploads {path, size, mtime[, sha256]}: the upload's id and offset."""
        if raw:
            raise _HttpError(ST_BAD_PATH, "no such API", 404)
        body = self._json_body(request)
        path, size, mtime = body.get("path"), body.get("size"), body.get("mtime")
        if not isinstance(path, str):
            raise _HttpError(ST_BAD_PATH, 'the body needs "path", a string')
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or size >= 1 << 63:
            raise _HttpError(ST_PROTOCOL, 'the body needs "size", a whole number of bytes')
        try:
            mtime_ns = time.time_ns() if mtime is None else _seconds_ns(
                str(mtime) if isinstance(mtime, (int, _JsonFloat))
                and not isinstance(mtime, bool) else "x")
        except ValueError:
            raise _HttpError(ST_PROTOCOL, '"mtime" is not a time in seconds') from None
        digest = body.get("sha256")
        if digest is not None:
            if not isinstance(digest, str) or not _HTTP_HEX_DIGEST.match(digest):
                raise _HttpError(ST_PROTOCOL, '"sha256" is not 64 hex digits')
            digest = bytes.fromhex(digest)
        try:
            raw = path.encode("utf-8")
            parts = self.r._split(raw)
        except UnicodeEncodeError:
            raise _HttpError(ST_BAD_PATH, "path is not valid UTF-8") from None
        except XferError as e:
            self.s.commit.refusal(raw, e.code, str(e))
            raise _HttpError.of(raw, e) from None
        try:
            return self.web.start_upload(("/".join(parts), size, mtime_ns), raw, size,
                                         mtime_ns, digest, self.peer, self.s.ended)
        except _HttpError as e:
            if e.status not in (ST_BUSY, ST_SHUTDOWN):
                self.s.commit.refusal(raw, e.status, e.reason)  # as a push's
            if e.status == ST_SKIPPED:
                return 200, {"path": path, "skipped": True, "note": e.reason}
            raise

    def _put_chunk(self, request, raw):
        upload = self.web.upload(raw.decode("latin-1"))
        offset = request.query.get("offset", "")
        if not _ascii_digits(offset):
            raise _HttpError(ST_PROTOCOL, "a chunk needs ?offset=K")
        # A chunk cut off may still be unwinding on its old connection.
        if not upload.lock.acquire(timeout=CLAIM_SILENCE + 1.0):
            raise _HttpError(ST_CONFLICT, "another request is writing this upload",
                             extra={"offset": upload.offset})
        try:
            if upload.incoming is None:
                raise _HttpError(ST_BAD_PATH, _NO_UPLOAD, 404)      # it ended meanwhile
            try:
                return upload.chunk(self, request, int(offset))
            finally:
                if upload.incoming is None:        # it ended here: counted here
                    self.s.ended.append(upload.commit)
        finally:
            upload.lock.release()

    def _cancel_upload(self, request, raw):
        upload = self.web.upload(raw.decode("latin-1"))
        if not upload.lock.acquire(timeout=CLAIM_SILENCE + 1.0):
            raise _HttpError(ST_CONFLICT, "another request is writing this upload")
        try:
            upload.cancel()
        finally:
            upload.lock.release()
        return 204, (b"", ())

    def _served(self, raw):
        """(components, lstat, name) below DIR of a GET, confined as GET and
        LIST are: read through _walk_served."""
        self._require_get()
        raw = raw.rstrip(b"/")
        try:
            return self.s._served(raw)
        except (FileNotFoundError, NotADirectoryError):
            raise _HttpError(ST_BAD_PATH, "%s: no such file or directory" % _display(raw),
                             404) from None
        except (XferError, OSError) as e:
            raise _HttpError.of(raw, e) from None

    def _list(self, request, raw):
        """GET /api/list/PATH: one directory's entries, streamed as they are read."""
        parts, st, name = self._served(raw)
        dest = self.s.store.dest
        if stat.S_ISDIR(st.st_mode):
            entries = _list_dir(dest, parts, raw)
        else:
            entries = _walk_served(dest, parts, name, raw, False)
        try:
            first = next(entries, None)
        except OSError as e:
            raise _HttpError.of(raw, e) from None
        self._send_head(200, _HTTP_JSON_HEADERS)
        body = _HttpBody(self.sock)
        body.write(b'{"path": %s, "entries": [' % json.dumps(
            raw.rstrip(b"/").decode("utf-8")).encode())
        sep = b""
        try:
            for kind, _, entry_name, entry_st in itertools.chain(
                    [first] if first else [], entries):
                if kind == "other":
                    kind = "symlink" if stat.S_ISLNK(entry_st.st_mode) else "other"
                body.write(sep + json.dumps({
                    "name": entry_name, "type": kind,
                    "size": entry_st.st_size if kind == "file" else 0,
                    "mtime": _seconds(entry_st.st_mtime_ns),
                    "mode": stat.S_IMODE(entry_st.st_mode)}).encode())
                sep = b", "
        except OSError:
            raise _HttpCut() from None      # the listing breaks off: never a short one
        body.write(b"]}")
        body.close()

    def _download(self, request, raw):
        """GET /api/files/PATH: the file, or the Range asked for."""
        parts, st, name = self._served(raw)
        if not stat.S_ISREG(st.st_mode):
            raise _HttpError(ST_CONFLICT, "%s: %s; not served" % (
                _display(raw), "a directory (see /api/list/ and /api/zip/)"
                if stat.S_ISDIR(st.st_mode) else "a symlink or special file"))
        for _, where, _, _ in _walk_served(self.s.store.dest, parts, name, raw, False):
            self._send_download(request, raw, name, where, st)
        return None

    def _send_download(self, request, raw, name, where, st):
        try:
            f = self.s.store.dest.open_served(where, st)
        except OSError as e:
            raise _HttpError.of(raw, e) from None
        with f:
            now = os.fstat(f.fd)
            if not stat.S_ISREG(now.st_mode) or (now.st_ino, now.st_dev) != (
                    st.st_ino, st.st_dev):
                raise _HttpError(ST_CONFLICT, "%s: replaced while being served" % _display(raw))
            size = f.size
            etag = '"%x-%x"' % (size, f.mtime_ns)
            modified = _http_date(f.mtime_ns // 10**9)
            headers = [("Content-Type", "application/octet-stream"),
                       ("Content-Disposition", _http_attachment(name)),
                       ("Accept-Ranges", "bytes"), ("Last-Modified", modified), ("ETag", etag),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")]
            first, last, code = 0, size - 1, 200
            wanted = request.headers.get("range")
            if wanted is not None and request.headers.get("if-range", etag) in (etag, modified):
                span = _http_range(wanted, size)
                if span == "unsatisfiable":
                    raise _HttpError(ST_BAD_PATH, "%s: the range is past its end (%d bytes)"
                                     % (_display(raw), size), 416,
                                     headers=[("Content-Range", "bytes */%d" % size)])
                if span is not None:
                    first, last = span
                    code = 206
                    headers.append(("Content-Range", "bytes %d-%d/%d" % (first, last, size)))
            self._send_head(code, headers, last - first + 1)
            if first:
                f.seek(first)
            self._send_file(f, last - first + 1)

    def _send_file(self, f, count, out=None):
        """count bytes of f to the client (or to out); the last of them only
        if the file did not change while it was read, else _HttpCut."""
        view = memoryview(self.s.buf)
        write = self.sock.sendall if out is None else out.write
        while count:
            try:
                n = f.readinto(view[:min(count, CHUNK)])
            except OSError:
                n = 0
            if not n:
                raise _HttpCut()            # it shrank
            count -= n
            if not count and f.changed():
                raise _HttpCut()
            write(view[:n])

    def _zip(self, request, raw):
        """GET /api/zip/PATH: the tree as a stored zip, streamed as it is read."""
        parts, st, name = self._served(raw)
        if not stat.S_ISDIR(st.st_mode):
            raise _HttpError(ST_CONFLICT, "%s: not a directory" % _display(raw))
        top = name or os.path.basename(self.r.dir.rstrip(os.sep)) or "xfer"
        self._send_head(200, [("Content-Type", "application/zip"), (
            "Content-Disposition", _http_attachment(top + ".zip")),
            ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
        body = _HttpBody(self.sock)
        archive = zipfile.ZipFile(body, "w", zipfile.ZIP_STORED, allowZip64=True)
        dest = self.s.store.dest
        for kind, where, entry_name, entry_st in _walk_served(dest, parts, top, raw):
            if kind not in ("dir", "file"):
                continue                    # symlinks and special files, as get skips them
            try:
                entry_name.encode("utf-8")
            except UnicodeEncodeError:
                continue                    # a name that is not UTF-8 cannot be stored
            if kind == "dir":
                info = zipfile.ZipInfo(entry_name + "/", _zip_time(time.time()))
                info.external_attr = (0o40755 << 16) | 0x10
                archive.writestr(info, b"")
                continue
            try:
                f = dest.open_served(where, entry_st)
            except OSError:
                continue
            with f:
                info = zipfile.ZipInfo(entry_name, _zip_time(f.mtime_ns / 1e9))
                info.external_attr = (stat.S_IFREG | stat.S_IMODE(f.mode)) << 16
                info.file_size = f.size
                with archive.open(info, "w", force_zip64=f.size >= 1 << 31) as out:
                    self._send_file(f, f.size, out)
        archive.close()
        body.close()

    _ROUTES = {
        ("GET", "session"): _session_info, ("POST", "login"): _login,
        ("POST", "logout"): _logout, ("PUT", "files"): _put_file, ("GET", "files"): _download,
        ("POST", "uploads"): _start_upload, ("PUT", "uploads"): _put_chunk,
        ("DELETE", "uploads"): _cancel_upload, ("GET", "list"): _list, ("GET", "zip"): _zip,
    }


def _seconds(ns):
    """Seconds of a time in nanoseconds, as near as a float gets (ns / 1e9 is
    not: 1600000000250000000 / 1e9 is 1600000000.2499998)."""
    return ns // 10**9 + ns % 10**9 / 1e9


def _zip_time(seconds):
    """A zip entry's local date and time (1980 to 2107, what the format holds)."""
    t = time.localtime(max(315532800, min(seconds, 4354819198)))[:6]
    return max(t, (1980, 1, 1, 0, 0, 0))


#------------------------------------------------------------
# the browser page (README "Browser")
#------------------------------------------------------------
# GET / serves this one document: inline CSS and JavaScript, nothing loaded
# from elsewhere (the page's Content-Security-Policy allows nothing else).
# It speaks the HTTP API only (README "HTTP API"), and sets every name as
# text, never as HTML.

_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>xfer</title>
<style>
:root { color-scheme: light dark; --fg: #1b1b1f; --bg: #f6f6f4; --mut: #5e5e66;
  --acc: #1c5fb0; --card: #fff; --line: #d8d8dc; --bad: #b3261e; --ok: #1e7b34; }
@media (prefers-color-scheme: dark) { :root { --fg: #ececf0; --bg: #151518; --mut: #a6a6b0;
  --acc: #7fb0f0; --card: #202024; --line: #3a3a42; --bad: #ff8a80; --ok: #7bd88f; } }
* { box-sizing: border-box; }
body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; align-items: center; gap: .75rem; padding: .6rem 1rem;
  border-bottom: 1px solid var(--line); background: var(--card); }
h1 { font-size: 1.25rem; margin: 0; }
h2 { font-size: 1.05rem; margin: 0 0 .75rem; }
#server { flex: 1; color: var(--mut); overflow-wrap: anywhere; }
main { max-width: 72rem; margin: 0 auto; padding: 1rem; }
@media (max-width: 30rem) { main { padding: .6rem; } .card { padding: .8rem; } }
#app { display: grid; gap: 1rem; }
@media (min-width: 60rem) { #app.both { grid-template-columns: 1fr 1fr; align-items: start; } }
.card { background: var(--card); border: 1px solid var(--line); border-radius: .5rem;
  padding: 1rem; }
#login { max-width: 24rem; margin: 2rem auto; display: grid; gap: .6rem; }
input[type=text] { font: inherit; padding: .55rem .6rem; width: 100%;
  border: 1px solid var(--line); border-radius: .4rem; background: var(--bg); color: var(--fg); }
button, .button { font: inherit; min-height: 2.75rem; padding: .45rem 1rem; border-radius: .4rem;
  border: 1px solid var(--acc); background: var(--acc); color: var(--card); cursor: pointer; }
button.quiet { background: transparent; color: var(--acc); min-height: 2.25rem;
  padding: .2rem .7rem; }
.button { position: relative; display: inline-flex; align-items: center; overflow: hidden; }
.button input { position: absolute; top: 0; left: 0; width: 100%; height: 100%; opacity: 0;
  cursor: pointer; }
:focus-visible, .button:focus-within { outline: 3px solid #f0a020; outline-offset: 2px; }
.button input:focus-visible { outline: none; }
.row { display: flex; flex-wrap: wrap; gap: .5rem; align-items: center; }
#drop { border: 2px dashed var(--line); border-radius: .5rem; padding: 1.25rem 1rem;
  margin-bottom: .75rem; text-align: center; color: var(--mut); }
#drop.over { border-color: var(--acc); color: var(--acc); }
@media (pointer: coarse) { #drop { display: none; } }
progress { width: 100%; height: .8rem; accent-color: var(--acc); }
#overall-box { margin: .75rem 0 .25rem; }
.mut, .note { color: var(--mut); font-size: .9rem; }
ul { list-style: none; margin: 0; padding: 0; }
.upload { display: grid; grid-template-columns: 1fr auto; gap: .15rem .75rem; align-items: center;
  padding: .5rem 0; border-top: 1px solid var(--line); }
.upload progress { grid-column: 1 / -1; }
.name { overflow-wrap: anywhere; }
.upload.failed .note, .error { color: var(--bad); }
.upload.done .note { color: var(--ok); }
#crumbs { margin-bottom: .5rem; overflow-wrap: anywhere; }
#crumbs a { color: var(--acc); }
.entry { display: grid; grid-template-columns: 1fr auto auto; gap: 0 .75rem; align-items: baseline;
  padding: .45rem 0; border-top: 1px solid var(--line); }
.entry a { color: var(--acc); }
.entry .size { text-align: right; font-variant-numeric: tabular-nums; }
@media (max-width: 30rem) { .entry { grid-template-columns: 1fr auto; }
  .entry .date { grid-column: 1; grid-row: 2; } }
[hidden] { display: none !important; }
</style>
</head>
<body>
<header><h1>xfer</h1><span id="server"></span>
<button id="logout" class="quiet" type="button" hidden>Log out</button></header>
<main>
<form id="login" class="card" hidden>
  <h2>Log in</h2>
  <label for="secret">The pairing code that <code>serve</code> shows, or the token</label>
  <input id="secret" type="text" autocomplete="off" autocapitalize="none" spellcheck="false"
    required>
  <button id="login-button">Log in</button>
  <p id="login-error" class="error" role="alert"></p>
</form>
<div id="app" hidden>
  <section class="card" aria-labelledby="send-title">
    <h2 id="send-title">Send to this computer <span id="target" class="mut"></span></h2>
    <div id="drop">Drop files or folders here</div>
    <div class="row">
      <label class="button">Choose files<input type="file" id="picker" multiple></label>
      <label class="button">Choose a folder<input type="file" id="folder-picker"
        webkitdirectory></label>
    </div>
    <div id="overall-box" hidden>
      <label for="overall" id="overall-text" class="mut" aria-live="polite"></label>
      <progress id="overall" max="1" value="0"></progress>
    </div>
    <ul id="uploads"></ul>
  </section>
  <section id="fetch" class="card" aria-labelledby="fetch-title" hidden>
    <h2 id="fetch-title">Fetch from this computer</h2>
    <nav id="crumbs" aria-label="Folder"></nav>
    <p class="row"><a id="zip" class="mut">Download this folder as a zip</a></p>
    <ul id="listing"></ul>
  </section>
</div>
</main>
<script>
"use strict";
var $ = function (id) { return document.getElementById(id); };
var S = {chunk: 8388608, allowGet: false, cwd: ""};
var WORKERS = 2, SHOW_MAX = 2000, RETRY_MAX = 30000;
var waiting = [], uploads = [], active = 0;

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;   // names are text, never HTML
  return e;
}
function enc(path) { return path.split("/").map(encodeURIComponent).join("/"); }
function bytes(n) {
  var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : n) + " " + u[i];
}
function pause(ms) { return new Promise(function (ok) { setTimeout(ok, ms); }); }
function api(method, path, body, headers, signal) {
  // X-Xfer: a page from another origin cannot add it without a preflight,
  // which the server refuses: the server's guard against forged requests.
  var h = {"X-Xfer": "1"};
  for (var k in headers || {}) h[k] = headers[k];
  return fetch(path, {method: method, body: body, headers: h, credentials: "same-origin",
                      cache: "no-store", signal: signal});
}
async function answer(r) { try { return await r.json(); } catch (e) { return {}; } }

// SHA-256 of each chunk.  Web Crypto exists only in a secure context
// (https, or http on 127.0.0.1 / localhost); a phone on http://192.168.x.y
// has none, so the page carries its own (FIPS 180-4), fast enough for a
// chunk at a time.
var K256 = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2]);
function sha256js(buffer) {
  var data = new Uint8Array(buffer), n = data.length, full = n - n % 64;
  var tail = new Uint8Array(n - full < 56 ? 64 : 128), v = new DataView(tail.buffer);
  tail.set(data.subarray(full));
  tail[n - full] = 0x80;
  v.setUint32(tail.length - 8, Math.floor(n / 0x20000000));
  v.setUint32(tail.length - 4, (n * 8) >>> 0);
  var h = new Int32Array([0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                          0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19]);
  var w = new Int32Array(64);
  function blocks(p, end) {
    for (var o = 0; o < end; o += 64) {
      for (var i = 0; i < 16; i++) {
        var j = o + 4 * i;
        w[i] = p[j] << 24 | p[j + 1] << 16 | p[j + 2] << 8 | p[j + 3];
      }
      for (i = 16; i < 64; i++) {
        var a = w[i - 15], b = w[i - 2];
        w[i] = w[i - 16] + w[i - 7] + ((a >>> 7 | a << 25) ^ (a >>> 18 | a << 14) ^ a >>> 3)
             + ((b >>> 17 | b << 15) ^ (b >>> 19 | b << 13) ^ b >>> 10) | 0;
      }
      var A = h[0], B = h[1], C = h[2], D = h[3], E = h[4], F = h[5], G = h[6], H = h[7];
      for (i = 0; i < 64; i++) {
        var t1 = H + ((E >>> 6 | E << 26) ^ (E >>> 11 | E << 21) ^ (E >>> 25 | E << 7))
               + (E & F ^ ~E & G) + K256[i] + w[i] | 0;
        var t2 = ((A >>> 2 | A << 30) ^ (A >>> 13 | A << 19) ^ (A >>> 22 | A << 10))
               + (A & B ^ A & C ^ B & C) | 0;
        H = G; G = F; F = E; E = D + t1 | 0; D = C; C = B; B = A; A = t1 + t2 | 0;
      }
      h[0] += A; h[1] += B; h[2] += C; h[3] += D; h[4] += E; h[5] += F; h[6] += G; h[7] += H;
    }
  }
  blocks(data, full);
  blocks(tail, tail.length);
  return Array.from(h, function (x) { return (x >>> 0).toString(16).padStart(8, "0"); }).join("");
}
async function sha256hex(buffer) {
  if (!(window.crypto && crypto.subtle)) return sha256js(buffer);
  var d = new Uint8Array(await crypto.subtle.digest("SHA-256", buffer));
  return Array.from(d, function (x) { return x.toString(16).padStart(2, "0"); }).join("");
}

async function start() {
  var s = {};
  try { s = await answer(await api("GET", "/api/session")); } catch (e) {
    $("server").textContent = "cannot reach the server"; return;
  }
  S.chunk = s.chunk || S.chunk;
  S.allowGet = !!s.allow_get;
  $("server").textContent = s.name ? "on " + s.name : "";
  document.title = s.name ? "xfer - " + s.name : "xfer";
  var login = !!s.auth && !s.logged_in;
  $("login").hidden = !login;
  $("app").hidden = login;
  $("logout").hidden = !(s.auth && s.logged_in);
  if (login) { $("secret").focus(); return; }
  $("fetch").hidden = !S.allowGet;
  $("app").classList.toggle("both", S.allowGet);
  if (S.allowGet) show(here());
}

$("login").addEventListener("submit", async function (ev) {
  ev.preventDefault();
  $("login-button").disabled = true;
  $("login-error").textContent = "";
  try {
    var r = await api("POST", "/api/login", JSON.stringify({secret: $("secret").value.trim()}),
                      {"Content-Type": "application/json"});
    if (r.ok) { $("secret").value = ""; await start(); }
    else $("login-error").textContent = (await answer(r)).error || "login failed: " + r.status;
  } catch (e) { $("login-error").textContent = "cannot reach the server"; }
  $("login-button").disabled = false;
});
$("logout").addEventListener("click", async function () {
  try { await api("POST", "/api/logout"); } catch (e) {}
  start();
});

// -- sending
function add(files) {
  var prefix = S.allowGet && S.cwd ? S.cwd + "/" : "";
  files.forEach(function (f) {
    var u = {file: f.file, path: prefix + f.path, size: f.file.size, done: 0,
             mtime: f.file.lastModified / 1000, state: "waiting", ctrl: new AbortController()};
    u.li = el("li", "upload");
    u.li.dataset.name = u.path;
    u.bar = el("progress");
    u.bar.max = Math.max(u.size, 1);
    u.bar.value = 0;
    u.bar.setAttribute("aria-label", u.path);
    u.note = el("span", "note", "waiting");
    u.cancel = el("button", "quiet", "Cancel");
    u.cancel.type = "button";
    u.cancel.setAttribute("aria-label", "Cancel " + u.path);
    u.cancel.onclick = function () { cancel(u); };
    var name = el("span", "name", u.path + " ");
    name.append(u.note);
    u.li.append(name, u.cancel, u.bar);
    $("uploads").append(u.li);
    uploads.push(u);
    waiting.push(u);
  });
  overall();
  pump();
}
function note(u, state, text) {
  if (u.state == "cancelled") return;   // a request still finishing says nothing more
  u.state = state;
  u.note.textContent = text;
  u.li.className = "upload " + state;
  if (state == "done" || state == "failed" || state == "cancelled") u.cancel.hidden = true;
  overall();
}
function overall() {
  var total = 0, done = 0, files = 0, finished = 0;
  uploads.forEach(function (u) {
    if (u.state == "cancelled") return;
    files++; total += u.size; done += u.done;
    if (u.state == "done" || u.state == "failed") finished++;
  });
  $("overall-box").hidden = !uploads.length;
  $("overall").max = Math.max(total, 1);
  $("overall").value = total ? done : (files && finished == files ? 1 : 0);
  $("overall-text").textContent = finished + " of " + files + " files, " + bytes(done) + " of "
    + bytes(total);
}
function pump() {
  while (active < WORKERS && waiting.length) {
    var u = waiting.shift();
    if (u.state == "waiting") run(u);
  }
}
async function run(u) {
  active++;
  try { await send(u); } catch (e) { note(u, "failed", "failed: " + e.message); }
  active--;
  pump();
  if (!active && S.allowGet) show(S.cwd);
}
function finish(u, j) {
  u.done = u.size;
  u.bar.value = u.bar.max;
  note(u, "done", j.skipped ? "skipped: already there" : j.note ? "done, " + j.note : "done");
}
var TRANSIENT = [408, 502, 503, 504];
async function send(u) {
  var delay = 250, bad = 0, why;
  note(u, "sending", "sending");
  for (;;) {
    why = "connection lost";
    try {
      // Asking again after a failure is the resume: the same path, size
      // and mtime give the same upload back, with the offset the server holds.
      var r = await api("POST", "/api/uploads",
                        JSON.stringify({path: u.path, size: u.size, mtime: u.mtime}),
                        {"Content-Type": "application/json"}, u.ctrl.signal);
      var j = await answer(r);
      while (r.ok && r.status != 201 && !j.skipped) {
        if (j.upload != null) u.id = j.upload;
        var offset = j.offset;
        if (typeof offset != "number") throw new TypeError("no offset in the answer");
        u.done = offset;
        u.bar.value = offset;
        note(u, "sending", "sending, " + Math.floor(100 * offset / u.size) + "%");
        var buf = await u.file.slice(offset, Math.min(u.size, offset + S.chunk)).arrayBuffer();
        r = await api("PUT", "/api/uploads/" + encodeURIComponent(u.id) + "?offset=" + offset, buf,
                      {"X-Chunk-SHA256": await sha256hex(buf)}, u.ctrl.signal);
        j = await answer(r);
        if (r.status == 409 && typeof j.offset == "number") r = {ok: true, status: 200};
        else if (r.status == 422 && ++bad < 3) { j.offset = offset; r = {ok: true, status: 200}; }
        delay = 250;
      }
      if (r.ok) return finish(u, j);
      if (r.status == 401) { note(u, "failed", "failed: not logged in"); return start(); }
      if (TRANSIENT.indexOf(r.status) < 0) {
        return note(u, "failed", "failed: " + (j.error || r.status));
      }
      why = j.error || "the server is busy";
    } catch (e) {
      if (u.ctrl.signal.aborted) return;
      if (!(e instanceof TypeError)) throw e;   // what fetch throws when the network fails
    }
    note(u, "retrying", why + ", trying again"
                        + (delay < 1000 ? "" : " in " + delay / 1000 + " s"));
    await pause(delay);
    if (u.ctrl.signal.aborted) return;
    delay = Math.min(2 * delay, RETRY_MAX);
  }
}
function cancel(u) {
  if (u.state == "done" || u.state == "failed" || u.state == "cancelled") return;
  note(u, "cancelled", "cancelled");
  u.ctrl.abort();
  if (u.id == null) return;
  api("DELETE", "/api/uploads/" + encodeURIComponent(u.id)).catch(function () {});
}
function picked(ev) {
  add(Array.from(ev.target.files, function (f) {
    return {file: f, path: f.webkitRelativePath || f.name};
  }));
  ev.target.value = "";
}
$("picker").addEventListener("change", picked);
$("folder-picker").addEventListener("change", picked);
async function walk(entry, out) {
  if (entry.isFile) {
    var f = await new Promise(function (ok, no) { entry.file(ok, no); });
    out.push({file: f, path: entry.fullPath.replace(/^\/+/, "")});
  } else if (entry.isDirectory) {
    var reader = entry.createReader();
    for (;;) {
      var batch = await new Promise(function (ok, no) { reader.readEntries(ok, no); });
      if (!batch.length) break;
      for (var i = 0; i < batch.length; i++) await walk(batch[i], out);
    }
  }
}
document.addEventListener("dragover", function (ev) {
  ev.preventDefault();
  $("drop").classList.add("over");
});
document.addEventListener("dragleave", function (ev) {
  if (!ev.relatedTarget) $("drop").classList.remove("over");
});
document.addEventListener("drop", async function (ev) {
  ev.preventDefault();
  $("drop").classList.remove("over");
  if ($("app").hidden) return;
  // Take the entries before the first await: the drop's data ends with the event.
  var items = Array.from(ev.dataTransfer.items || []), files = Array.from(ev.dataTransfer.files);
  var out = [];
  var entries = items.map(function (i) { return i.webkitGetAsEntry && i.webkitGetAsEntry(); });
  if (entries.length && entries.every(Boolean)) {
    for (var i = 0; i < entries.length; i++) await walk(entries[i], out);
  } else files.forEach(function (f) { out.push({file: f, path: f.name}); });
  add(out);
});
window.addEventListener("beforeunload", function (ev) {
  if (active) { ev.preventDefault(); ev.returnValue = ""; }
});

// -- fetching (serve --allow-get)
function here() {
  try {
    return location.hash.slice(1).split("/").filter(Boolean).map(decodeURIComponent).join("/");
  } catch (e) { return ""; }
}
window.addEventListener("hashchange", function () { if (S.allowGet) show(here()); });
function link(text, href) { var a = el("a", null, text); a.href = href; return a; }
async function show(path) {
  S.cwd = path;
  $("target").textContent = path ? "(into " + path + "/)" : "";
  var crumbs = $("crumbs"), box = $("listing"), parts = path ? path.split("/") : [];
  crumbs.textContent = "";
  crumbs.append(link("all files", "#"));
  parts.forEach(function (p, i) {
    crumbs.append(" / ", link(p, "#" + enc(parts.slice(0, i + 1).join("/"))));
  });
  $("zip").href = "/api/zip/" + enc(path);
  var r, j;
  try { r = await api("GET", "/api/list/" + enc(path)); j = await answer(r); } catch (e) {
    box.textContent = ""; box.append(el("li", "error", "cannot reach the server")); return;
  }
  if (S.cwd != path) return;   // another folder was opened meanwhile
  box.textContent = "";
  if (!r.ok) {
    box.append(el("li", "error", j.error || "cannot list (" + r.status + ")"));
    if (r.status == 401) start();
    return;
  }
  var entries = (j.entries || []).slice().sort(function (a, b) {
    var dirs = (b.type == "dir") - (a.type == "dir");
    return dirs || (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  });
  if (!entries.length) box.append(el("li", "mut", "(empty)"));
  entries.slice(0, SHOW_MAX).forEach(function (e) {
    var full = path ? path + "/" + e.name : e.name;
    var li = el("li", "entry"), name = el("span", "name");
    li.dataset.name = e.name;
    if (e.type == "dir") {
      name.append(link(e.name + "/", "#" + enc(full)), " ",
                  link("(zip)", "/api/zip/" + enc(full)));
    } else if (e.type == "file") {
      var a = link(e.name, "/api/files/" + enc(full));
      a.download = e.name;
      name.append(a);
    } else name.textContent = e.name;
    var date = new Date(e.mtime * 1000);
    li.append(name, el("span", "size mut", e.type == "file" ? bytes(e.size) : ""),
              el("span", "date mut", isNaN(date) ? "" : date.toLocaleString()));
    box.append(li);
  });
  if (entries.length > SHOW_MAX) {
    box.append(el("li", "mut", "and " + (entries.length - SHOW_MAX)
                                 + " more: use the zip, or xfer get"));
  }
}
start();
</script>
</body>
</html>
"""


#------------------------------------------------------------
# sending side
#------------------------------------------------------------
# One file's way out, in the order of this section:
#   _walk_tree   one scandir walk of a tree; each file comes with a stat, used
#                for CHECK and for the FILE header: the one the walk that added
#                up the tree's size made (_tree_totals keeps the first
#                _WALK_KEPT), or a new one past those
#   _Outgoing    the outgoing file: open, read whole (small) or in chunks
#                (large), the hash, "did it change while it was sent"; it
#                knows nothing of jobs or connections, so whatever serves a
#                file (a Sender pushing it, a server answering a pull) reads
#                it the same way
#   Job          what a caller holds for each queued file or tree
#   _Ledger      the counts and endings of a Sender's jobs, shared by its threads
#   _Link        one connection: a method per message kind (CHECKS, MKDIR,
#                BATCH for small files, FILE for large ones, PING, BYE), one
#                wait helper, and a reader thread that ends jobs as their
#                answers (RESULTS, RESULT) arrive
#   _Worker      the loop that feeds one link batches of jobs, reconnecting
#                and retrying
#   Sender       the public API; its feeder thread walks trees and hands the
#                workers jobs in batches; the reconnect schedule
# Threads: the caller's (queue, poll, close), one feeder, `workers` workers
# each with the reader thread of its link, and one per ping_async().

# The feeder hands the workers a tree's jobs in lists of at most this many
# files or bytes, and a worker takes no more than that at once: small files
# go by the hundred (one queue hop, one wake-up each), large ones one or two
# at a time, so every worker gets its share.
_HANDOVER_FILES = CHECK_BATCH
_HANDOVER_BYTES = 8 * CHUNK


# The walk that adds up a tree's size hands on its first files and
# directories, up to this many, as it finds them: the receiver is asked
# about them while it goes on, and the walk that queues the rest skips
# them, so a tree of that many files is stat'ed once, and a larger one once
# for those files; it lists again only the directories not all of whose
# files were handed on.  Those it holds while the work queue has no room
# (about 400 bytes each) are bounded, whatever the size of the tree.
_WALK_KEPT = 8192


class _Seen:
    """What a walk keeps of a file's stat: what CHECKS and the header use."""
    __slots__ = ("st_size", "st_mtime_ns", "st_mode")

    def __init__(self, st):
        self.st_size = st.st_size
        self.st_mtime_ns = st.st_mtime_ns
        self.st_mode = st.st_mode


def _walk_tree(path, name, cancelled=None, seen=None, listed=None):
    """Yield (kind, path, name, stat or error) for a tree, depth first, lazily.

    kind is "dir" (with None), "file" (with its os.stat_result, following a
    symlink to a file) or "error" (with the OSError of a directory that
    cannot be listed).  name is the path below the tree's parent, joined
    with "/".  Directory entries are never collected into lists (only the
    pending subdirectories are), so a directory of a million files costs
    no more memory than one of ten.  Symlinks to directories are not
    followed.  cancelled, a callable, is asked before each directory.
    seen, from _tree_totals, names what an earlier walk handed on already:
    {directory path: set of its file names, or the list of its
    subdirectories if all its files were}; those directories and files are
    not yielded again, a directory of the second kind is not even listed
    again, and each entry is taken out of it as it is used.  listed(path,
    subdirs), if given, is told each directory's subdirectories (the
    (path, name) pairs this walk goes on with) once it has been listed.
    (What a server offers to get and ls is walked by _walk_served.)
    """
    stack = [(path, name)]
    while stack:
        if cancelled is not None and cancelled():
            return
        path, name = stack.pop()
        known = seen.pop(path, None) if seen else None
        if known is None:
            yield "dir", path, name, None
        elif isinstance(known, list):
            stack.extend(reversed(known))     # every file of it went already
            continue
        subdirs = []
        prefix = name + "/" if name else ""
        try:
            with os.scandir(path) as it:
                for entry in it:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append((entry.path, prefix + entry.name))
                        elif entry.is_file() and not (known and entry.name in known):
                            yield "file", entry.path, prefix + entry.name, entry.stat()
                    except OSError:
                        continue      # gone meanwhile, or a dangling symlink
        except OSError as e:
            yield "error", path, name, e
        else:
            if listed is not None:
                listed(path, subdirs)
        stack.extend(reversed(subdirs))


def _tree_totals(path, name="", cancelled=None, keep=0, found=None):
    """(bytes, files, seen) of what _walk_tree yields for a tree: its size
    before any is sent.  Its first directories and files, up to keep of
    them, are told to found(kind, path, name, stat) as the walk meets them
    (the Sender hands them on at once), and seen names them for a later
    _walk_tree, which skips them: {directory path: set of file names}, or,
    for a directory all of whose files were told, its subdirectories, so
    that the later walk does not list it again (in a tree of a few large
    directories, listing them again cost about as much as this walk's
    stats).  A directory counts as one of the keep too, so seen stays
    bounded in a tree of empty ones."""
    total = count = 0
    seen = {}
    files = None          # the names told of the directory being listed
    whole = False         # ... and whether that is all of them

    def listed(where, subdirs):
        if whole:
            seen[where] = subdirs

    for kind, where, name, st in _walk_tree(path, name, cancelled, listed=listed):
        if kind == "file":
            total += st.st_size
            count += 1
            if files is not None:
                if keep > 0:
                    keep -= 1
                    files.add(name.rpartition("/")[2])
                    if found is not None:
                        found(kind, where, name, st)
                else:
                    whole = False
        elif kind == "dir":
            files = None
            whole = False
            if keep > 0:
                keep -= 1
                files = seen[where] = set()
                whole = True
                if found is not None:
                    found(kind, where, name, st)
    return total, count, seen


# Why send refuses a FIFO, device or socket: it has no size to announce, and
# reading one may never end.
_NOT_REGULAR = "not a regular file (for a stream, give '-' and pipe it to standard input)"


def _send_pieces(sendmsg, pieces):
    """sendall() for a list of buffers, through a socket's sendmsg."""
    while pieces:
        some = pieces[:_IOV_MAX]
        sent = sendmsg(some)
        if sent == sum(map(len, some)):      # the usual case: all of them went
            pieces = pieces[_IOV_MAX:]
            continue
        done = 0
        while done < len(pieces) and sent >= len(pieces[done]):
            sent -= len(pieces[done])
            done += 1
        pieces = pieces[done:]
        if sent:
            pieces[0] = memoryview(pieces[0])[sent:]


# How an outgoing file is opened.  O_NONBLOCK: opening a FIFO must not wait
# for a writer (the sender refuses it once it sees what it is); reads of
# regular files ignore it.
_READ = os.O_RDONLY | _O_BINARY | _O_NONBLOCK
_READ_NOFOLLOW = _READ | _O_NOFOLLOW


class _Outgoing:
    """One file on its way out: opened once, read whole or in chunks.

    st is the stat the walk made; the header is built from it, without a
    second system call.  None (a file queued on its own whose stat failed)
    stats the opened file.  Attributes: path, size, mtime_ns, mode (st_mode,
    type bits included).  Use as a context manager; close() closes the file.
    """
    __slots__ = ("path", "fd", "size", "mtime_ns", "mode", "_file", "dir_fd")

    def __init__(self, path, st=None, nofollow=False, dir_fd=None):
        self.path = path
        self.dir_fd = dir_fd        # path is relative to it (a server's get)
        # nofollow (a server's get): a symlink put in a file's place is not opened.
        self.fd = os.open(path, _READ_NOFOLLOW if nofollow else _READ, dir_fd=dir_fd)
        self._file = None
        if st is None:
            try:
                st = os.fstat(self.fd)
            except BaseException:
                os.close(self.fd)
                raise
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.mode = st.st_mode

    def _take(self, st):
        self.size = st.st_size
        self.mtime_ns = st.st_mtime_ns
        self.mode = st.st_mode

    def read_all(self):
        """The whole content of a small file, in one read.

        If the file's size changed since its stat, it is stated again and
        read as it is now; raises OSError if it changes while it is read,
        or grew past STREAM_MAX.
        """
        data = os.read(self.fd, self.size + 1)
        if len(data) != self.size:
            self._take(os.fstat(self.fd))
            os.lseek(self.fd, 0, os.SEEK_SET)
            data = os.read(self.fd, self.size + 1) if self.size <= STREAM_MAX else b""
            if len(data) != self.size:
                raise OSError(errno.EIO, "it changed while it was read")
        return data

    def readinto(self, view):
        """Read the next bytes into view; return how many (0 at the end)."""
        if self._file is None:
            self._file = io.FileIO(self.fd, "rb", closefd=False)   # whole chunks: no buffer
        return self._file.readinto(view)

    def seek(self, offset):
        os.lseek(self.fd, offset, os.SEEK_SET)

    def changed(self):
        """True if the file's size or mtime is no longer what was announced."""
        try:
            if self.dir_fd is None:
                now = os.stat(self.path)
            else:
                now = os.stat(self.path, dir_fd=self.dir_fd, follow_symlinks=False)
        except OSError:
            return True
        return now.st_mtime_ns != self.mtime_ns or now.st_size != self.size

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _hash_prefix(f, h, count, buf):
    """Hash the first count bytes of f (an _Outgoing) into h; leave f just after them."""
    view = memoryview(buf)
    f.seek(0)
    while count:
        n = f.readinto(view[:min(count, len(view))])
        if not n:
            raise OSError(errno.EIO, "the file shrank")
        h.update(view[:n])
        count -= n


class _Generated:
    """Incompressible generated bytes standing in for a file (bench).

    open() gives an object read like an _Outgoing.
    """
    _block = None

    def __init__(self, size):
        self.size = size
        if _Generated._block is None:
            _Generated._block = os.urandom(CHUNK + 4096)

    def open(self):
        return _GeneratedReader(self.size, self._block)


class _GeneratedReader:
    mtime_ns = 0
    mode = stat.S_IFREG | 0o644
    path = "(generated)"

    def __init__(self, size, block):
        self.size = size
        self.left = size
        self.block = memoryview(block)
        self.offset = 0

    def readinto(self, view):
        n = min(len(view), self.left)
        done = 0
        while done < n:
            k = min(n - done, CHUNK)
            view[done:done + k] = self.block[self.offset:self.offset + k]
            self.offset = (self.offset + 4093) % 4096     # shift, so chunks differ
            done += k
        self.left -= n
        return n

    def read_all(self):
        buf = bytearray(self.left)
        got = self.readinto(memoryview(buf)) if buf else 0
        return bytes(buf[:got])

    def seek(self, offset):
        self.left = self.size - offset
        self.offset = offset % 4096

    def changed(self):
        return False

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _wire_name(job):
    """job.name as the wire carries it: UTF-8 bytes.

    A local name that is not valid UTF-8 (Python decodes it with
    surrogateescape) has no such bytes; that file alone fails (README
    "send and send-dir").
    """
    try:
        return job.name.encode("utf-8")
    except UnicodeEncodeError:
        raise XferError("%s: name is not valid UTF-8; rename it to send it"
                        % job.path) from None


class Job:
    """One file (or one directory tree) queued on a Sender.

    Read-only attributes, safe to read from any thread: state ("queued",
    "sending", "verifying" (hashing the part the receiver kept, before
    resuming after it), "done", "failed", "skipped", "cancelled"), bytes_done, size,
    progress (0.0-1.0), error (an XferError or None), path (local),
    name (relative path on the receiver), kind ("file", "dir", or "ping"
    for Sender.ping_async()), resumed (bytes the receiver already had),
    digest (sha256 hex of what was sent), result (a ping's answer),
    started and finished (time.monotonic() values, or None).
    A "dir" job aggregates the files of its tree: its size and files_total
    are known before its first file is sent, and it ends when every file
    has ended.
    """

    # Defaults shared by every job, for what most jobs never change; each is
    # set on the job when it changes.  What every sent file changes is set in
    # __init__ instead: an attribute added to an object after it was made
    # grows its __dict__: set later, these cost a sent file about 2.5 us,
    # made here about 0.5 us (measured, Python 3.11).
    source = None           # a _Generated instead of the file at path (bench)
    resumed = 0             # bytes not sent again because the receiver had them
    result = None           # ping jobs: what ping() returns; list jobs: the entries;
                            # a get's file: its FileInfo
    request = None          # get and list jobs: what to ask the server
    files_total = 0         # dir jobs: files in the tree (known before any is sent)
    _epoch = 0              # the Sender's failed connections when it was queued
    files = 0               # dir jobs: files ended
    failures = ()           # dir jobs: a list of (name, error) of files that failed
    _pending = 0            # dir jobs: walk + files not ended
    _found = None           # dir jobs of files found already (a watch): their Jobs
    _cancel = False         # a flag, not an Event: nothing waits for it
    _ended = None           # an Event, made only once someone waits
    _held = None            # dir jobs, while the walk adds up their size: the
                            # endings of their files, held (_Ledger.sizing)
    _ending_held = False    # its ending is in its tree's _held: never send it again

    def __init__(self, ledger, path, name, kind="file", parent=None, st=None):
        self._ledger = ledger
        self.path = path
        self.name = name
        self.kind = kind
        self.parent = parent
        self._stat = st         # the walk's stat (os.stat_result or _Seen): the one of the file
        self.size = 0 if st is None else st.st_size
        self.state = "queued"
        self.attempts = 0
        self.bytes_done = 0
        self.started = None
        self.finished = None
        self.digest = None      # sha256 hex of the content sent, once it was sent
        self.note = ""          # the receiver's word on success: "replaced", "renamed to ..."
        self.error = None
        self._done = False
        if kind in ("dir", "get"):
            self.failures = []
            self._pending = 1   # the walk (a get: its request, until DONE)

    @property
    def progress(self):
        if self.state in ("done", "skipped"):
            return 1.0
        size = self.size
        return min(1.0, self.bytes_done / size) if size else 0.0

    @property
    def done(self):
        """True once the job has ended, in any state."""
        return self._done

    def wait(self, timeout=None):
        """Block until the job ends; return True if it has.  Not for a host's main thread."""
        with self._ledger.lock:
            if self._done:
                return True
            if self._ended is None:
                self._ended = threading.Event()
            ended = self._ended
        return ended.wait(timeout)

    def cancel(self):
        """Stop this job as soon as possible; no final file is left on the receiver."""
        self._cancel = True

    @property
    def cancelled(self):
        return self._cancel or (self.parent is not None and self.parent._cancel)

    def __repr__(self):
        return "<Job %s %r %s %d/%d>" % (self.kind, self.name, self.state,
                                          self.bytes_done, self.size)


class _Ledger:
    """The counts and endings of one Sender's jobs, shared by its threads.

    end() ends a job exactly once: it counts it, wakes its waiters, fires
    its callback, and ends its tree's job after the tree's last file.
    Callbacks go through the dispatcher; on_finished(job) is told when a
    top-level job has ended.
    """

    def __init__(self, dispatch, on_progress=None, on_done=None, on_error=None,
                 on_start=None, on_finished=None):
        self.dispatch = dispatch
        self.on_progress = on_progress
        self.on_done = on_done
        self.on_error = on_error
        self.on_start = on_start
        self.on_finished = on_finished
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)   # notified when unfinished drops to 0
        self.unfinished = 0          # top-level jobs not ended
        self.files_done = 0
        self.files_failed = 0
        self.files_skipped = 0
        self.files_cancelled = 0
        self.bytes_sent = 0
        self.bytes_resumed = 0
        self.bodies = set()          # large files whose body is being sent
        self.kept = 0                # bytes of bodies cancelled midway

    def started(self, job):
        """A file's bytes start to go out (again, after a retry)."""
        job.state = "sending"
        if job.started is None:
            job.started = time.monotonic()
        if job.kind == "file" and self.on_start is not None:
            self.dispatch.emit(self.on_start, job)

    def progress(self, job, n):
        """n more bytes of job are done (negative: taken back for a retry)."""
        self.progress_all(((job, n),))

    def progress_all(self, counts):
        """progress() for each (job, n) of counts (a BATCH's files): one lock
        for all, and one on_progress for each job told (a tree's job: once)."""
        told = {}                    # a dict: ordered, each job once
        with self.lock:
            for job, n in counts:
                job.bytes_done += n
                parent = job.parent
                if parent is not None:
                    parent.bytes_done += n
                    job = parent
                told[job] = None
        if self.on_progress is not None:
            for job in told:
                self.dispatch.emit_progress(self.on_progress, job)

    def resize(self, job, size):
        """The file's size is not what the walk saw: the tree's size follows."""
        if job.parent is not None:
            with self.lock:
                job.parent.size += size - job.size
        job.size = size

    def add(self, top, n):
        """n more parts of top's tree are pending (each ends once)."""
        with self.lock:
            top._pending += n

    def end(self, job, state, error=None):
        """End job in state ("done", "skipped", "failed" or "cancelled"), once."""
        self.end_all(((job, state, error),))

    def end_all(self, endings):
        """end() for each (job, state, error) of endings (the answers of one
        RESULTS): their counts under one lock, then, in order, their waiters,
        callbacks and trees."""
        told = {}                    # jobs whose progress rose (progress_all's)
        ended = []                   # (job, ok, its Event, its parent, that if it ended)
        now = time.monotonic()
        on_progress, on_done, on_error = self.on_progress, self.on_done, self.on_error
        with self.lock:
            for job, state, error in endings:
                if job._done:
                    continue
                kind = job.kind
                parent = job.parent
                if parent is not None and parent._held is not None:
                    parent._held.append((job, state, error))   # told once it is sized
                    job._ending_held = True
                    continue
                if state == "skipped" and kind != "mkdir":
                    n = job.size - job.bytes_done      # already there counts as done
                    job.bytes_done += n
                    if parent is not None:
                        parent.bytes_done += n
                        told[parent] = None
                    else:
                        told[job] = None
                job.state = state
                job.error = error
                job.finished = now
                if kind in _REQUEST_KINDS:
                    pass              # a get's files count, a list has none
                elif kind == "mkdir":
                    if state == "failed":
                        self.files_failed += 1
                elif state == "done":
                    self.files_done += 1
                    self.bytes_sent += job.size - job.resumed
                    self.bytes_resumed += job.resumed
                elif state == "skipped":
                    self.files_skipped += 1
                elif state == "cancelled":
                    self.files_cancelled += 1
                else:
                    self.files_failed += 1
                tree = None
                if parent is not None:
                    if kind != "mkdir":
                        parent.files += 1
                    if error is not None:
                        parent.failures.append((job.name, error))
                    parent._pending -= 1
                    if parent._pending == 0:
                        tree = parent
                job._done = True
                ok = state in ("done", "skipped")
                # A file of a tree that nobody waits for or is told about
                # needs nothing more (most files of a tree sent again).
                if (parent is None or tree is not None or job._ended is not None
                        or (on_done if ok and kind != "mkdir" else on_error if not ok
                            else None) is not None):
                    ended.append((job, ok, job._ended, parent, tree))
        if on_progress is not None:
            for job in told:
                self.dispatch.emit_progress(on_progress, job)
        for job, ok, event, parent, tree in ended:
            if event is not None:
                event.set()
            callback = on_done if ok else on_error
            if parent is None:
                if ok and on_progress is not None:
                    self.dispatch.emit_progress(on_progress, job)   # the final 1.0
            elif ok and job.kind == "mkdir":
                callback = None       # a directory made is not news
            if callback is not None:
                self.dispatch.emit(callback, job)
            if parent is None:
                self._finished(job)
            elif tree is not None:
                self._end_tree(tree)

    def sizing(self, top):
        """top's size is being added up: its files' endings wait for sized()."""
        with self.lock:
            top._held = []

    def sized(self, top):
        """top's size and files_total are known: end what was held."""
        with self.lock:
            held, top._held = top._held, None
        if held:
            self.end_all(held)

    def withdraw(self, job):
        """A get's file cut off with its connection: the get is asked again
        on a new one (the file with it) or fails as a whole, so this try of
        the file is taken back from the get's counts, never counted itself."""
        with self.lock:
            if job._done:
                return
            job._done = True
            top = job.parent
            top._pending -= 1
            top.files_total -= 1
            top.size -= job.size
            top.bytes_done -= job.bytes_done
            finished = top._pending == 0
            ended = job._ended
        if ended is not None:
            ended.set()
        if finished:
            self._end_tree(top)

    def part_ended(self, top):
        """A pending part of top's tree that is no job (its walk) has ended."""
        with self.lock:
            top._pending -= 1
            finished = top._pending == 0
        if finished:
            self._end_tree(top)

    def _end_tree(self, top):
        if top.failures:
            top.state = "cancelled" if top.cancelled else "failed"
            name, err = top.failures[0]
            more = len(top.failures) - 1
            # One failure keeps its class (a get refused as a whole: its RemoteError).
            top.error = XferError("%s (and %d more)" % (err, more)) if more else err
        else:
            top.state = "done"
        top.finished = time.monotonic()
        with self.lock:
            top._done = True
            ended = top._ended
        if ended is not None:
            ended.set()
        if top.state == "done" and self.on_progress is not None:
            self.dispatch.emit_progress(self.on_progress, top)   # the final 1.0
        callback = self.on_done if top.state == "done" else self.on_error
        if callback is not None:
            self.dispatch.emit(callback, top)
        self._finished(top)

    def _finished(self, job):
        if self.on_finished is not None:
            self.on_finished(job)
        with self.idle:
            self.unfinished -= 1
            if not self.unfinished:
                self.idle.notify_all()

    def body_started(self, job):
        with self.lock:
            self.bodies.add(job)

    def body_ended(self, job, cut):
        """job's body is no longer being sent; cut: it stopped before its end."""
        with self.lock:
            self.bodies.discard(job)
            if cut and job.cancelled:
                self.kept += job.bytes_done

    def bytes_kept(self):
        with self.lock:
            return self.kept + sum(j.bytes_done for j in self.bodies if j.cancelled)


_STOP = object()
# Jobs that ask the server for something (Protocol 4.9, 4.10) rather than send a file.
_REQUEST_KINDS = ("get", "list")


class _LinkBroken(Exception):
    """The connection failed; pending jobs may be retried on a new one."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


# How long a TLS call that needs the other direction first waits before it
# looks again (_SharedTls).
_TLS_CROSS_WAIT = 0.05


class _SharedTls:
    """A TLS connection that two threads use at once: a link's reader
    receives while its worker sends.

    OpenSSL allows one call at a time on a connection, and Python's ssl
    module does not make them wait for each other: a read beside a write
    now and then breaks the connection (the reader sees it end, the
    receiver an EOF that violates the protocol), and may crash the process.
    So each call is made under one lock, on a non-blocking socket, and the
    waits until the socket can be read or written are made outside it: a
    reader waiting for answers never holds up a send, and a send waiting
    for room never holds up the read that makes room.  The timeout applies
    to each wait, as it would on the socket.
    """

    def __init__(self, sock):
        self.sock = sock
        self.lock = threading.Lock()
        self.timeout = sock.gettimeout()
        self.waits = {}              # (event, reading) -> the selector that waits for it
        sock.setblocking(False)

    def settimeout(self, timeout):
        self.timeout = timeout

    def fileno(self):
        return self.sock.fileno()

    def pending(self):
        with self.lock:
            return self.sock.pending()

    def recv_into(self, view):
        return self._call(self.sock.recv_into, view, True)

    def sendall(self, data):
        view = memoryview(data)
        while view:
            view = view[self._call(self.sock.send, view, False):]

    def shutdown(self, how):
        with self.lock:
            self.sock.shutdown(how)

    def close(self):
        with self.lock:
            self.sock.close()
        for selector in self.waits.values():
            selector.close()

    def _call(self, method, data, reading):
        deadline = None
        while True:
            with self.lock:
                try:
                    return method(data)
                except ssl.SSLWantReadError:
                    event = selectors.EVENT_READ
                except ssl.SSLWantWriteError:
                    event = selectors.EVENT_WRITE
            if deadline is None and self.timeout is not None:
                deadline = time.monotonic() + self.timeout
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise socket.timeout("timed out")
            wait = left
            if (event == selectors.EVENT_READ) != reading:
                # A send that must read first (a handshake message), or a
                # read that must write: the other thread may do it
                # meanwhile, so look again soon.
                wait = _TLS_CROSS_WAIT if left is None else min(left, _TLS_CROSS_WAIT)
            # One selector per event and direction, each used by one thread
            # at a time: reads by the reader; writes by the worker, or by the
            # reader of a get while the worker waits for it.
            key = (event, reading)
            selector = self.waits.get(key)
            if selector is None:
                selector = self.waits[key] = _Selector()
                selector.register(self.sock, event)
            selector.select(wait)


def _held_back(job):
    """A file of a tree whose size is still being added up (_Ledger.sizing)."""
    return job.kind == "file" and job.parent is not None and job.parent._held is not None


class _Link:
    """One sender connection: one method per message kind, a reader thread for answers.

    The worker thread writes: check() (CHECKS, Protocol 4.14) for a batch
    of jobs, then pump() sends each file the receiver needs (mkdir() for
    MKDIR, _batched() gathers small files into a BATCH, _large() sends
    FILE), bye() at the end; ping() on a link of its own.  The reader
    thread (_read_loop) takes the answers (RESULTS for many files at once)
    and ends the jobs through the ledger.  Every wait for an answer is
    _wait(), which first sends the BATCH being gathered.
    A failed connection raises _LinkBroken from the worker's calls.

    sock, rfile and seal come from a finished handshake; ledger counts and
    ends the jobs; peer names the receiver in messages, refuser in its
    refusals; wanted(job) says whether a job is still to be sent (and ends
    it if not); abort is set when the Sender is closed without waiting;
    nudge() is called on the reader thread once answers were taken or the
    connection broke (it wakes a worker waiting for answers or work).
    """

    #: the class a file is opened with (Sender's docstring)
    _outgoing_class = _Outgoing

    def __init__(self, sock, rfile, seal, ledger, peer, refuser=None, skip="quick",
                 discard=False, timeout=DEFAULT_IO_TIMEOUT, wanted=None, abort=None,
                 nudge=None):
        self.sock = sock
        self.rfile = rfile
        self.seal = seal             # tags what this end sends, in the order it goes out
        self.ledger = ledger
        self.peer = peer
        self.refuser = refuser or peer
        self.skip = skip
        self.discard = discard
        self.timeout = timeout
        self.wanted = wanted or (lambda job: not job.cancelled)
        self.abort = abort or threading.Event()
        self.nudge = nudge or (lambda: None)
        self.last_id = 0             # request ids count from 1 (_new_ids)
        self.broken = None
        self.cv = threading.Condition()
        self.pending = {}            # id -> job, sent and waiting for its RESULT
        self.accepts = {}            # id -> (offset, sha256 of that prefix)
        self.checks = {}             # id -> job, CHECKs without an answer
        self.answers = {}            # id -> status of answered CHECKs not yet pumped
        self.asked = collections.deque()   # (job, CHECK id or None) not yet sent
        self.handing = None          # the job send() is handing over: no longer asked,
                                     # maybe not yet in the BATCH or in flight
        # The BATCH being gathered (Protocol 4.12): its jobs, their entries
        # and bodies; ids are given when it goes out (send_batch).
        self.batch, self.entries, self.bodies = [], [], []
        self.batch_bytes = 0
        self.batch_head = _BATCH.size
        self.bye_seen = False
        # (id, handler) of the GET or LIST whose answer the reader takes next
        self.request = None
        self.buf = bytearray(CHUNK)
        self.wbuf = []               # writes gathered to go out together
        self.wlen = 0
        # sendmsg sends the gathered pieces as they are, without joining them
        # (a BATCH's bodies stay the bytes read); a TLS socket refuses it.
        self.gather = True
        self.reader = None

    # -- writing and waiting

    def _write(self, data):
        """Send data; small writes are gathered and go out together.

        A body chunk (a memoryview of the reused buffer) goes out at once.
        Whoever is about to wait for the receiver calls flush() first.
        """
        self.wbuf.append(data)
        self.wlen += len(data)
        if self.wlen >= _GATHER or isinstance(data, memoryview):
            self.flush()

    def flush(self):
        """Send the gathered writes."""
        pieces = self.wbuf
        if not pieces:
            return
        self.wbuf = []
        self.wlen = 0
        try:
            sendmsg = self.gather and getattr(self.sock, "sendmsg", None)
            if len(pieces) > 1 and sendmsg:
                try:
                    _send_pieces(sendmsg, pieces)
                    return
                except NotImplementedError:     # TLS: nothing was sent
                    self.gather = False
            self.sock.sendall(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        except socket.timeout:
            self._break(ConnectionClosedError("the server stopped reading for %ss"
                                              % self.timeout))
            raise _LinkBroken(self.broken) from None
        except OSError as e:
            if isinstance(e, BrokenPipeError):
                # The receiver closed its end: a write (CHECKS go out at
                # once) may find it before the reader does, and says the same.
                self._break(ConnectionClosedError("%s closed the connection" % self.peer))
            else:
                self._break(ConnectionClosedError("connection lost: %s" % (e.strerror or e)))
            raise _LinkBroken(self.broken) from None

    def _wait(self, ready):
        """Return once ready() is true, sending the gathered BATCH and writes
        first; raise _LinkBroken if the connection breaks before.  ready()
        runs under the lock the reader thread holds while it takes answers."""
        if ready():
            return
        self.send_batch()
        self.flush()
        self._start_reader()
        with self.cv:
            while not ready():
                if self.broken is not None:
                    raise _LinkBroken(self.broken)
                self.cv.wait(0.5)

    def _new_ids(self, n=1):
        """The first of n consecutive new request ids (only the worker asks)."""
        first = self.last_id + 1
        self.last_id += n
        return first

    def _register(self, fid, job):
        """Wait for room in the window, then count the job as in flight."""
        pending = self.pending
        self._wait(lambda: len(pending) < WINDOW)
        pending[fid] = job

    def _fail_local(self, job, error):
        """End a job whose request could not be made; nothing of it is on the wire."""
        if isinstance(error, OSError):
            error = XferError("%s: %s" % (job.path, error.strerror or error))
        elif not isinstance(error, XferError):   # a bug: loudly, but this file alone
            traceback.print_exc()
            error = XferError("internal error: %r" % error)
        self.ledger.end(job, "failed", error)

    # -- CHECKS: ask about a batch, then send what is needed

    def check(self, jobs):
        """Queue jobs for sending; ask about their files without waiting: one
        CHECKS (Protocol 4.14) per run of files in one directory.

        Identical files end as "skipped" on the reader thread when their
        answer arrives; pump() sends the others.  A file that cannot be read
        ends "failed".
        """
        self._start_reader()
        frames, group, directory = [], [], None
        asked = self.asked
        ask = self.skip is not None
        for job in jobs:
            job.attempts += 1
            entry = None
            if ask and job.kind == "file" and job.source is None:
                try:
                    entry = self._check_entry(job)
                except Exception as e:   # nothing of it was counted or written
                    self._fail_local(job, e)
                    continue
            if entry is None or (group and (entry[0] != directory
                                            or len(group) >= BATCH_FILES)):
                self._ask(directory, group, frames)
                group = []
            if entry is None:
                asked.append((job, None))
            else:
                directory = entry[0]
                group.append((job, entry[1]))
        self._ask(directory, group, frames)
        if frames:
            # Out at once: the receiver answers them while this end walks,
            # asks and sends on, rather than once this end waits.
            self._write(b"".join(frames))
            self.flush()

    def _check_entry(self, job):
        """(directory, CHECKS entry) for a job's file; None: send it unasked."""
        st = job._stat
        if st is None:
            st = job._stat = os.stat(job.path)
        if not stat.S_ISREG(st.st_mode):
            return None       # _file() reports it
        digest = None
        if self.skip == "checksum":
            with open(job.path, "rb") as f:
                digest = _hash_fd(f.fileno(), self.buf).digest()
        directory, _, name = _wire_name(job).rpartition(b"/")
        return directory, _checks_entry(st.st_size, st.st_mtime_ns, name, digest)

    def _ask(self, directory, group, frames):
        """Append the CHECKS frame about group, (job, entry) pairs of one
        directory, to frames."""
        if not group:
            return
        first = self._new_ids(len(group))
        checks, asked = self.checks, self.asked
        for fid, (job, _) in enumerate(group, first):
            # Counted only once the request exists: an answer is then sure to come.
            checks[fid] = job
            asked.append((job, fid))
        flags = CF_CHECKSUM if self.skip == "checksum" else 0
        frames.append(self.seal(_encode_checks(first, flags, directory,
                                               [entry for _, entry in group])))

    def pump(self, keep):
        """Send asked jobs in order, oldest first, until at most keep are left
        (or the oldest is held back, _take_oldest)."""
        asked, answers = self.asked, self.answers
        while len(asked) > keep:
            fid = asked[0][1]
            if fid is not None and fid not in answers:
                self._wait(lambda: fid in answers)
            if not self._take_oldest():
                break
        if not keep:
            self.send_batch()
            self.flush()          # the worker may now wait for more jobs

    def pump_answered(self):
        """Send asked jobs in order, oldest first, while their answers are
        in; True if any was taken.  Once none is left asked, the gathered
        BATCH and writes go out (the worker may now wait for more jobs)."""
        asked, answers = self.asked, self.answers
        taken = False
        while asked:
            fid = asked[0][1]
            if (fid is not None and fid not in answers) or not self._take_oldest():
                break
            taken = True
        if not asked:
            self.send_batch()
            self.flush()
        return taken

    def _take_oldest(self):
        """Send (or drop, if the receiver has it) the oldest asked job, whose
        answer is in; False, leaving it asked, if it is a file of a tree whose
        size is still being added up: no byte of a tree goes before that."""
        job, fid = self.asked[0]
        needed = fid is None or self.answers[fid] == ST_NEEDED
        if needed and _held_back(job):
            return False
        self.asked.popleft()
        if fid is not None:
            del self.answers[fid]
        if needed and self.wanted(job):
            self.send(job)
        return True

    def answered(self):
        """True if the oldest asked job can be taken (its answer is in, and it
        is not held back), or the connection broke."""
        asked = self.asked
        if self.broken is not None or not asked:
            return True
        job, fid = asked[0]
        if fid is None:
            return not _held_back(job)
        status = self.answers.get(fid)
        return status is not None and not (status == ST_NEEDED and _held_back(job))

    def send(self, job):
        """Send one job on this connection; returns once its bytes are written.

        The one way from a job to its message kind, pump()'s too: the check
        of the reader and of the kind cost a file about 0.15 us more than
        calling _file() itself (measured), nothing beside the rest."""
        self._start_reader()
        self.handing = job           # if the link breaks meanwhile, take_pending() has it
        if job.kind == "mkdir":
            self.mkdir(job)
        elif job.kind in _REQUEST_KINDS:
            self.ask(job)
        else:
            self._file(job)
        self.handing = None

    # -- MKDIR

    def mkdir(self, job):
        """Make the directory of a tree's job on the receiver (Protocol 4.6)."""
        self.ledger.started(job)
        fid = self._new_ids()
        try:
            mode = stat.S_IMODE(os.stat(job.path).st_mode)
        except OSError:
            mode = 0o755
        try:
            frame = _frame(_Msg.MKDIR, _MKDIR.pack(fid, mode) + _wire_name(job))
        except Exception as e:
            self._fail_local(job, e)
            return
        self._register(fid, job)
        self._write(self.seal(frame))

    # -- FILE

    def _file(self, job):
        """Send a file: in a BATCH if small, else announced and streamed."""
        ledger = self.ledger
        ledger.started(job)
        st, job._stat = job._stat, None          # used once: a retry stats again
        if st is not None and not stat.S_ISREG(st.st_mode):
            self._not_regular(job, st.st_mode)
            return
        try:
            out = (self._outgoing_class(job.path, st) if job.source is None
                   else job.source.open())
        except Exception as e:
            self._fail_local(job, e)
            return
        with out:
            if not stat.S_ISREG(out.mode):
                self._not_regular(job, out.mode)
            elif out.size <= SMALL_MAX:
                self._batched(job, out)
            else:
                if job.size != out.size:
                    ledger.resize(job, out.size)
                self._large(job, out)

    def _not_regular(self, job, mode):
        if stat.S_ISDIR(mode):
            error = XferError("%s: is a directory (use send -r or send-dir)" % job.path)
        else:
            error = XferError("%s: %s" % (job.path, _NOT_REGULAR))
        self.ledger.end(job, "failed", error)

    def _header(self, fid, job, out, flags):
        if self.discard:
            flags |= FF_DISCARD
        return _encode_file(fid, out.size, out.mtime_ns, out.mode & 0o7777, flags,
                            _wire_name(job))

    def _batched(self, job, out):
        """Add a small file to the BATCH being gathered (Protocol 4.12): its
        content read whole and hashed now; it goes out once the BATCH is
        full, or before the worker waits (_wait) or sends a large file."""
        try:
            data = out.read_all()
            digest = hashlib.sha256(data).digest()
            entry = _batch_entry(len(data), out.mtime_ns, out.mode & 0o7777,
                                 FF_DISCARD if self.discard else 0, digest, _wire_name(job))
        except Exception as e:    # nothing is on the wire yet: just end the job
            self._fail_local(job, e)
            return
        size = len(data)
        if job.size != size:      # first sight, or it changed since the walk
            self.ledger.resize(job, size)
        job.digest = digest.hex()
        batch = self.batch
        if batch and (len(batch) >= BATCH_FILES or self.batch_bytes + size > BATCH_BYTES
                      or self.batch_head + len(entry) > MAX_FRAME_PAYLOAD):
            self.send_batch()
            batch = self.batch
        pending = self.pending
        if len(pending) + len(batch) >= WINDOW:
            self._wait(lambda: len(pending) + len(self.batch) < WINDOW)
            batch = self.batch
        batch.append(job)
        self.entries.append(entry)
        self.bodies.append(data)
        self.batch_bytes += size
        self.batch_head += len(entry)

    def send_batch(self):
        """Send the gathered BATCH, its bodies after it; its files count as in
        flight (within WINDOW: _batched made room)."""
        jobs, entries, bodies = self.batch, self.entries, self.bodies
        if not jobs:
            return
        # Counted before the write, all at once: once written, the RESULTS
        # (and the jobs' ends) may arrive on the reader thread at any moment.
        self.ledger.progress_all(zip(jobs, map(len, bodies)))
        if any(job.cancelled for job in jobs):     # cancelled while it waited here
            kept = [i for i, job in enumerate(jobs) if not job.cancelled]
            for job in jobs:
                if job.cancelled:
                    self.ledger.end(job, "cancelled", XferError("%s: cancelled" % job.name))
            jobs, entries, bodies = ([seq[i] for i in kept] for seq in (jobs, entries, bodies))
        first = self.last_id + 1
        frame = _encode_batch(first, entries) if jobs else None
        self.batch, self.entries, self.bodies = [], [], []
        self.batch_bytes, self.batch_head = 0, _BATCH.size
        if frame is None:
            return
        self._new_ids(len(jobs))
        pending = self.pending
        for fid, job in enumerate(jobs, first):
            pending[fid] = job
        # The bodies join the gathered writes as they were read: no copy.
        frame = self.seal(frame)
        self.wbuf.append(frame)
        self.wbuf.extend(bodies)
        self.wlen += len(frame) + sum(map(len, bodies))
        if self.wlen >= _GATHER:
            self.flush()

    def _large(self, job, out):
        """FILE, wait for ACCEPT (resume offset), BODY, the content, TRAILER."""
        self.send_batch()         # the files queued before it go before it
        fid = self._new_ids()
        try:
            header = self._header(fid, job, out, 0)
        except Exception as e:
            self._fail_local(job, e)
            return
        self._register(fid, job)
        self._write(self.seal(header))
        accepts, pending = self.accepts, self.pending
        self._wait(lambda: fid in accepts or fid not in pending)
        accepted = accepts.pop(fid, None)
        if accepted is None:
            return  # refused; the RESULT already ended the job
        offset, prefix = accepted
        size = out.size
        h = hashlib.sha256()
        start = 0
        if 0 < offset < size:
            # Resume only from bytes proven equal: hash our own first
            # offset bytes and compare with the receiver's partial.
            job.state = "verifying"
            try:
                _hash_prefix(out, h, offset, self.buf)
            except OSError as e:
                self._abandon(fid, job, "%s: %s" % (job.path, e.strerror or e))
            job.state = "sending"
            if hmac.compare_digest(h.digest(), prefix):
                start = offset
            else:
                h = hashlib.sha256()
                out.seek(0)
        self._write(self.seal(_frame(_Msg.BODY, _BODY.pack(fid, start))))
        if start:
            job.resumed = start
            self.ledger.progress(job, start)
        self._body(out, fid, job, size - start, h)

    def _body(self, out, fid, job, count, h):
        """Stream count bytes of out (already positioned), then the TRAILER."""
        ledger = self.ledger
        view = memoryview(self.buf)
        left = count
        ledger.body_started(job)
        try:
            while left:
                if job.cancelled or job.done:
                    # Mid-body there is no way to stop but closing the
                    # connection; the receiver keeps what it got, to resume.
                    self._abandon(fid, job, None)
                try:
                    n = out.readinto(view[:min(left, CHUNK)])
                except OSError as e:
                    self._abandon(fid, job, "%s: %s" % (job.path, e.strerror or e))
                if not n:
                    self._abandon(fid, job, "%s shrank while it was sent" % job.path)
                chunk = view[:n]
                h.update(chunk)
                self._write(chunk)
                left -= n
                ledger.progress(job, n)
        finally:
            ledger.body_ended(job, cut=bool(left))
        flags = TF_ABORT if out.changed() else 0
        job.digest = h.hexdigest()
        self._write(self.seal(_encode_trailer(fid, flags, h.digest())))
        if flags & TF_ABORT:
            with self.cv:
                self.pending.pop(fid, None)
            ledger.end(job, "failed", XferError("%s changed while it was sent; not "
                                                "stored, send it again" % job.path))

    def _abandon(self, fid, job, reason):
        """Give up a file mid-body: close the connection so the receiver discards it."""
        with self.cv:
            self.pending.pop(fid, None)
        if job.cancelled:
            self.ledger.end(job, "cancelled", XferError("%s: cancelled" % job.name))
        elif reason is not None:
            self.ledger.end(job, "failed", XferError(reason))
        self._break(ConnectionClosedError("file abandoned mid-transfer"))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        raise _LinkBroken(self.broken)

    # -- GET and LIST: the server answers with frames and bodies of its own

    def ask(self, job):
        """Send a get's GET or a list's LIST (Protocol 4.9, 4.10); return once
        its DONE is in.  The reader thread takes the whole answer (_Pull,
        _Listing), which ends the job; nothing else is sent meanwhile, since
        a pull answers the server's large files as it goes.  The job stays
        pending until then, so a connection that breaks sends it again."""
        self.ledger.started(job)
        try:
            handler = (_Pull if job.kind == "get" else _Listing)(self, job)
        except Exception as e:       # LOCAL_DIR unusable: nothing is on the wire yet
            self._fail_local(job, e)
            return
        try:
            # Every earlier answer first: the frames after them are this request's.
            self.send_batch()
            self._wait(lambda: not self.pending and not self.checks)
            fid = self._new_ids()
            self.pending[fid] = job
            self.request = (fid, handler)
            self._write(self.seal(handler.frame(fid)))
            self.flush()
        except BaseException:
            handler.close()          # its answer will never be read
            raise
        self._wait(lambda: self.request is None)

    def _answer(self, first):
        """On the reader thread: the answer to the request in flight, from its first frame."""
        fid, handler = self.request
        handler.answer(fid, first)   # raises if the connection cannot go on
        with self.cv:
            self.pending.pop(fid, None)
            self.request = None
            self.cv.notify_all()

    # -- PING and BYE

    def ping(self):
        """PING, read the PONG on this thread (no reader runs); return ping()'s dict."""
        t0 = time.monotonic()
        self._write(self.seal(_frame(_Msg.PING)))
        self.flush()
        payload = _expect(self.rfile, _Msg.PONG)
        rtt = time.monotonic() - t0
        free, total = _PONG.unpack_from(payload)
        return {"version": payload[_PONG.size:].decode("utf-8", "replace"),
                "free": free, "total": total, "rtt": rtt}

    def bye(self):
        """Say BYE and wait for every result; raises _LinkBroken on failure."""
        self._start_reader()
        self.send_batch()
        self._write(self.seal(_frame(_Msg.BYE)))
        self._wait(lambda: self.bye_seen)

    # -- the reader thread

    def _start_reader(self):
        if self.reader is None:
            self.reader = threading.Thread(target=self._read_loop, name="xfer-link-reader",
                                           daemon=True)
            self.reader.start()

    def _read_loop(self):
        rfile = self.rfile
        try:
            while True:
                # Answers come in groups: take every frame already received
                # at once, so the worker is woken once per group, not per file.
                frames = [rfile.frame(MAX_FRAME_PAYLOAD)]
                if self.request is not None:
                    self._answer(frames[0])
                    continue
                error = None
                while error is None:
                    try:
                        more = rfile.buffered_frame(MAX_FRAME_PAYLOAD)
                    except XferError as e:    # the frames before it are good
                        error = e
                        break
                    if more is None:
                        break
                    frames.append(more)
                if self._take(frames):
                    return
                if error is not None:
                    raise error
        except ConnectionClosedError:
            # Its byte counts are about frames, which tell a person nothing.
            self._break(ConnectionClosedError("%s closed the connection" % self.peer))
        except XferError as e:
            self._break(e)
        except socket.timeout:
            self._break(ConnectionClosedError("the server did not answer within %ss"
                                              % self.timeout))
        except (OSError, ValueError) as e:
            self._break(ConnectionClosedError("connection lost: %s"
                                              % (getattr(e, "strerror", None) or e)))
        except Exception as e:
            # A defect here: the workers hear of it now, not at the timeout,
            # and the traceback is printed for a report (as the feeder does).
            traceback.print_exc()
            self._break(XferError("internal error reading the answers: %r" % e))

    def _take(self, frames):
        """Handle frames from the receiver, in order; True after its BYE."""
        ended = []                   # (job, status, reason), ended outside the lock
        bye = False
        error = None
        with self.cv:
            for kind, payload in frames:
                if kind == _Msg.RESULTS:
                    first, verdicts = _decode_results(payload)
                    fid = self._answered(first, verdicts, ended)
                    if fid is not None:
                        error = ProtocolError("RESULTS for unknown request %d" % fid)
                        break
                elif kind == _Msg.RESULT:
                    fid, status, reason = _decode_result(payload)
                    if self._answered(fid, ((status, reason),), ended) is not None:
                        error = ProtocolError("RESULT for unknown request %d" % fid)
                        break
                elif kind == _Msg.ACCEPT:
                    if len(payload) != _ACCEPT.size:
                        error = ProtocolError("ACCEPT payload of %d bytes" % len(payload))
                        break
                    fid, offset, prefix = _ACCEPT.unpack(payload)
                    self.accepts[fid] = (offset, prefix)
                elif kind == _Msg.BYE:
                    bye = True
                    break
                elif kind == _Msg.ERROR:
                    error = _decode_error(payload)
                    break
                else:
                    error = ProtocolError("unexpected %s" % _msg_name(kind))
                    break
            self.cv.notify_all()
        self.nudge()
        endings = []
        for job, status, reason in ended:
            job.note = reason
            if status == ST_OK:
                endings.append((job, "done", None))
            elif status == ST_SKIPPED:
                endings.append((job, "skipped", None))
            else:
                endings.append((job, "cancelled" if job.cancelled else "failed",
                                _error_for(status, reason, self.refuser)))
        if endings:
            self.ledger.end_all(endings)
        if error is not None:
            raise error
        if bye:
            with self.cv:
                self.bye_seen = True
                self.cv.notify_all()
        return bye

    def _answered(self, first, verdicts, ended):
        """Take the answers (status, reason) to ids first, first + 1, ... (a
        RESULTS, or one RESULT), under the lock: a sent file's or directory's
        goes to ended, a CHECK's to answers.  Returns the first id no request
        waits for, or None."""
        pending, checks, answers = self.pending, self.checks, self.answers
        for fid, (status, reason) in enumerate(verdicts, first):
            job = pending.pop(fid, None)
            if job is None:
                job = checks.pop(fid, None)
                if job is None:
                    return fid
                answers[fid] = status
                if status == ST_NEEDED:
                    continue
            ended.append((job, status, reason))
        return None

    def _break(self, error):
        with self.cv:
            if self.broken is None:
                self.broken = error
            self.cv.notify_all()
        self.nudge()

    # -- the end of a link

    def take_pending(self):
        """Jobs sent, asked about or being handed over that have not ended,
        for a new connection (nor had their ending held while their tree is
        sized)."""
        with self.cv:
            jobs = list(self.pending.values())
            self.pending.clear()
        jobs += [job for job, _ in self.asked] + self.batch
        handing, self.handing = self.handing, None
        if handing is not None and handing not in jobs:
            jobs.append(handing)
        self.asked.clear()
        self.batch, self.entries, self.bodies = [], [], []
        return [j for j in jobs if not (j.done or j._ending_held)]

    def close(self):
        try:
            # shutdown() first: it wakes a reader blocked in recv(), close() does not.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self.reader is not None and self.reader is not threading.current_thread():
            self.reader.join(5)


class _Worker:
    """One worker thread: feeds batches of jobs to its link, reconnecting as needed.

    Jobs are asked about in batches of up to CHECK_BATCH (CHECKS) and sent
    once their answers are in, while up to CHECK_AHEAD later jobs are
    already being asked about: no round trip stalls the stream.
    """

    def __init__(self, sender, first):
        self.sender = sender
        self.first = first
        self.link = None
        self.retry = collections.deque()
        self.spare = []      # jobs taken from the work queue beyond the last batch

    def run(self):
        sender = self.sender
        if not self.first:
            sender._wide.wait()
            if not sender._large:
                return
        try:
            self._loop()
        finally:
            if self.link is not None:
                self.link.close()
            end = sender._ledger.end
            for job in list(self.retry) + self.spare:
                if job.cancelled:
                    end(job, "cancelled", XferError("%s: cancelled" % job.name))
                else:
                    end(job, "failed", sender.error or XferError("%s: not sent" % job.name))

    def _batch(self, stopping):
        """(jobs to ask about now, stopping): blocks only when nothing is in flight."""
        work = self.sender._work
        link = self.link
        batch = []
        if link is not None and len(link.asked) > CHECK_AHEAD:
            return batch, stopping     # asked far enough ahead (a tree being sized)
        if self.retry:
            # After a broken connection, one job at a time: a file that
            # breaks connections then fails alone.
            batch.append(self.retry.popleft())
        elif self.spare:
            batch, self.spare = self.spare[:CHECK_BATCH], self.spare[CHECK_BATCH:]
        idle = link is None or not link.asked
        # Up to CHECK_BATCH files, or _HANDOVER_BYTES: the next large file
        # is left to a worker that is free.
        size = sum(j.size for j in batch)
        while (not stopping and not self.retry and len(batch) < CHECK_BATCH
               and size < _HANDOVER_BYTES):
            try:
                if batch or not idle:
                    jobs = work.get(block=False)
                elif link is not None and link.pending:
                    # Results are due: look up now and then, so a connection
                    # that breaks meanwhile is noticed and its files retried
                    # without waiting for work.
                    jobs = work.get(timeout=0.25)
                else:
                    jobs = work.get()
            except queue.Empty:
                if batch or not idle or link.broken is not None:
                    break
                continue
            if jobs is _STOP:
                stopping = True
            else:
                batch += jobs
                size += sum(j.size for j in jobs)
                if len(batch) > CHECK_BATCH:
                    self.spare = batch[CHECK_BATCH:]
                    batch = batch[:CHECK_BATCH]
        wanted = self.sender._still_wanted
        return [j for j in batch if wanted(j)], stopping

    def _loop(self):
        sender = self.sender
        stopping = False
        while True:
            batch, stopping = self._batch(stopping)
            link = self.link
            if link is not None and link.broken is not None and not link.asked:
                if link.pending:
                    # It broke while results were due: send those again.
                    self._requeue([], link.broken)
                else:
                    # It closed while idle (the receiver's idle timeout, or a
                    # restart): nothing was lost, so a new one costs no retry.
                    link.close()
                    self.link = None
                link = self.link
            try:
                if batch:
                    if link is None:
                        link = self.link = sender._connect()
                    link.check(batch)
                    # Keep asking ahead of sending, never more than
                    # CHECK_AHEAD files: what is answered meanwhile is sent
                    # once no more work is waiting.
                    link.pump(CHECK_AHEAD)
                elif link is not None and link.asked:
                    if not link.pump_answered():
                        self._await(link, stopping)
                elif stopping:
                    if link is not None:
                        link.bye()       # every result is in
                    return
            except _LinkBroken as e:
                self._requeue(batch, e.error)
            except XferError as e:      # no connection (_connect counted it)
                for job in batch:
                    sender._ledger.end(job, "cancelled" if job.cancelled else "failed", e)
            except Exception as e:   # a bug: fail the jobs loudly, keep the worker
                traceback.print_exc()
                error = XferError("internal error: %r" % e)
                for job in batch:
                    sender._ledger.end(job, "failed", error)
                if self.link is not None:
                    # It may count a request that never went out: never wait
                    # on it again; what it had in flight goes again.
                    self._requeue([], error)

    def _await(self, link, stopping):
        """Wait until the link's oldest asked job can be taken (answered, and
        its tree's size known), the link breaks, or more work it would take
        is queued: new files are asked about while the receiver still
        answers earlier ones, so both ends work at once."""
        link.send_batch()
        link.flush()
        sender = self.sender
        # Sender._nudge wakes it: work queued, answers taken, a link broken,
        # a tree's size known.  Not the work queue's own condition, whose
        # put() wakes one waiter only: this one, which may not take the
        # work, would swallow the wake-up of a worker idle in get().
        # Work it would not take: the stop marks of others, or more when it
        # has asked far enough ahead already (_batch).
        takes_work = not stopping and len(link.asked) <= CHECK_AHEAD
        with sender._stirred:
            if not (takes_work and sender._work.qsize()) and not link.answered():
                sender._stirred.wait(sender._stir_poll)
        if link.broken is not None:
            raise _LinkBroken(link.broken)     # what it had asked about goes again

    def _requeue(self, batch, error):
        """After a broken connection: send again, on a new one, what had not ended.

        Not after an answer that failed authentication: someone on the way
        alters what the receiver says, so nothing sent is known to have
        arrived, and the files fail instead of being reported sent.
        """
        sender = self.sender
        link, self.link = self.link, None
        jobs = link.take_pending() if link is not None else []
        jobs += [j for j in batch if not (j.done or j._ending_held) and j not in jobs]
        if link is not None:
            link.close()
        ledger = sender._ledger
        if isinstance(error, IntegrityError):
            # Counted as a failed connection: the jobs queued until now fail too.
            sender._connect_failed(error, time.monotonic())
            for j in jobs:
                ledger.end(j, "cancelled" if j.cancelled else "failed", error)
            return
        for j in jobs:
            # A get or list goes again only if the connection was lost: a
            # server that answered wrongly would answer wrongly again.
            again = j.kind not in _REQUEST_KINDS or isinstance(error, ConnectionError)
            if again and j.attempts <= sender.retries and not j.cancelled:
                j.state = "queued"
                ledger.progress(j, -j.bytes_done)
                self.retry.append(j)
            else:
                ledger.end(j, "cancelled" if j.cancelled else "failed", error)


class Sender:
    """Send files to one receiver over a bounded pool of connections.

    Methods for the caller: queue(), close(), poll(), wait(), ping(),
    ping_async(); usable as a context manager.  queue(), poll() and
    ping_async() never block and may be called from any thread;
    close(wait=True) blocks until every job has ended.  After a failed
    connection the Sender tries again for later jobs (RECONNECT_DELAYS).

    Callbacks receive the Job: on_start(job) when a file's bytes start to
    go out (again after a retry), on_progress(job), on_done(job) (sent or
    skipped), on_error(job) (failed or cancelled).
    With dispatch="thread" they run on one of its threads (the feeder, a
    worker, a link's reader); with dispatch="poll"
    they run only inside poll(), on the thread that calls it.

    Private attributes a subclass may override (as Receiver's parts; the
    tests hold a connection mid-file this way): _link_class, the class of
    each connection, which names the class it opens files with in its own
    _outgoing_class; _stir_poll, the longest a worker waiting for
    answers sleeps between looks (it is woken as soon as there is news:
    the poll is only a safety net); and _walk_kept, how many of a tree's
    first files and directories the walk that sizes it hands on.
    """

    _link_class = _Link
    _stir_poll = 0.5
    _walk_kept = _WALK_KEPT

    def __init__(self, to, token=None, workers=4, dispatch="thread", on_progress=None,
                 on_done=None, on_error=None, on_start=None, port=None,
                 connect_timeout=DEFAULT_CONNECT_TIMEOUT, timeout=DEFAULT_IO_TIMEOUT,
                 handshake_timeout=DEFAULT_HANDSHAKE_TIMEOUT, retries=3, retry_window=10.0, tls=False, fingerprint=None, known_hosts=None,
                 discard=False, skip="quick", require_server_auth=True):
        self.host, self.port = _parse_target(to, port)
        # How a receiver's refusal of a file names it: "HOST: a.tif: ..."
        self._refuser = "[%s]" % self.host if ":" in self.host else self.host
        self.tls = bool(tls or fingerprint)
        #: ask the receiver to verify and drop every file (benchmarks)
        self.discard = discard
        if skip not in ("quick", "checksum", None):
            raise ValueError("skip must be 'quick', 'checksum' or None, not %r" % (skip,))
        #: how to tell a file the receiver already has: "quick" (size and
        #: mtime), "checksum" (sha256 of both copies) or None (send everything)
        self.skip = skip
        self.fingerprint = fingerprint
        self.known_hosts = known_hosts
        self._pin_lock = threading.Lock()
        #: the server certificate's fingerprint once a TLS connection was made
        self.server_fingerprint = None
        #: True when that certificate was trusted on first use and recorded
        self.fingerprint_new = False
        self.token = _token_given(token)
        #: with a token, refuse a server that does not ask for one: it could
        #: be an impostor collecting the files
        self.require_server_auth = require_server_auth
        self.workers = max(1, int(workers))
        if self.workers > MAX_WORKERS:
            raise ValueError("workers must be at most %d, not %r" % (MAX_WORKERS, workers))
        self.connect_timeout = _seconds_given("connect_timeout", connect_timeout)
        self.handshake_timeout = _seconds_given("handshake_timeout", handshake_timeout)
        self.timeout = _seconds_given("timeout", timeout)
        #: True once a connection has finished its handshake
        self.connected = False
        self.retries = int(retries)
        self.retry_window = _seconds_given("retry_window", retry_window, zero=True, none=False)
        self._ping = None            # the last ping_async() job
        self._abort = threading.Event()     # close(wait=False): stop backing off
        self._dispatch = _Dispatcher(dispatch, self)
        self._ledger = _Ledger(self._dispatch, on_progress, on_done, on_error, on_start,
                               on_finished=self._top_finished)
        self._lock = self._ledger.lock
        # Lists of jobs; deep enough that each worker finds a batch waiting.
        self._work = queue.Queue(maxsize=2 * self.workers)
        # Notified (_nudge) when a worker waiting for answers may go on.
        self._stirred = threading.Condition()
        # Workers beyond the first connect only once a large file is queued
        # (_large): small files cost CPU per file, not bandwidth, and more
        # connections only make the receiver's threads take turns.  _wide
        # wakes them, for a large file or when the feeder is done.
        self._large = False
        self._wide = threading.Event()
        self._requests = collections.deque()
        self._requests_cv = threading.Condition()
        self._top = set()            # top-level jobs not yet ended (for close(wait=False))
        self._closing = False
        self._threads = []
        # After a failed connection: jobs queued before it fail with it
        # (_epoch counts failures), later ones wait for _retry_at.
        self._epoch = 0
        self._down = 0               # failed connection attempts in a row
        self._retry_at = 0.0
        self._failed_at = 0.0        # when the last one was counted
        self._retry_cv = threading.Condition(self._lock)
        #: the last connection-level failure (unreachable, auth, version);
        #: None again once a connection works
        self.error = None

    # -- methods for the caller

    def queue(self, path, target_name=None, subdir=None):
        """Queue a file or a directory tree; return its Job at once.

        The file lands at [subdir/]target_name on the receiver (default: the
        base name); a directory lands at [subdir/]NAME/... with its tree.
        A path that cannot be read gives a Job that fails with the reason.
        """
        if self._closing:
            raise XferError("the sender is closed")
        path = os.fspath(path)
        # abspath, so "." and "../out/" name the directory they stand for
        base = target_name or os.path.basename(os.path.abspath(path))
        if not base:
            raise XferError("%s: give a target_name for the root directory" % path)
        name = "/".join(p for p in (_clean_subdir(subdir), base) if p)
        kind = "dir" if os.path.isdir(path) else "file"
        return self._submit(Job(self._ledger, path, name, kind))

    def poll(self, max_events=None):
        """Run queued callbacks (dispatch="poll") on this thread; never blocks."""
        return self._dispatch.poll(max_events)

    def watch(self, path, subdir=None, settle=DEFAULT_SETTLE, interval=WATCH_INTERVAL,
              rescan=WATCH_RESCAN, include=(), exclude=()):
        """Watch a folder: send its files, then each new or changed one once it
        is complete; return a Watch at once (README "Watching a folder").

        Files land at [subdir/]NAME/... as queue() puts a tree.  settle: seconds
        a file's size and mtime must stay the same; interval: seconds between
        looks; rescan: seconds between looks that stat every file.  include
        and exclude: fnmatch patterns, on the name or the path below the
        folder; WATCH_IGNORE is always excluded.
        """
        if self._closing:
            raise XferError("the sender is closed")
        return Watch(self, path, subdir, settle, interval, rescan, include, exclude)

    def wait(self, timeout=None):
        """Block until every queued job has ended; return True if they have."""
        deadline = None if timeout is None else time.monotonic() + timeout
        ledger = self._ledger
        with ledger.idle:
            while ledger.unfinished:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                ledger.idle.wait(left)
        return True

    def close(self, wait=True):
        """Stop taking jobs and shut the workers down once the queue is done.

        wait=True blocks until every job has ended.  wait=False cancels
        every unfinished job and returns at once; the workers stop shortly
        after (a file in flight is abandoned, never left under its final
        name).  Safe to call more than once, from any thread but a callback.
        """
        with self._requests_cv:
            if not self._closing:
                self._closing = True
                self._requests.append(_STOP)
                self._requests_cv.notify()
            if not wait:
                self._abort.set()
                for job in self._top:
                    job.cancel()
        if not wait:
            with self._retry_cv:
                self._retry_cv.notify_all()     # a worker waiting to reconnect
        if wait:
            with self._lock:
                threads = list(self._threads)
            for t in threads:
                t.join()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(wait=exc_type is None)

    def get(self, remote_path, local_dir=".", overwrite="replace", protect=()):
        """Queue a get: copy a file or tree from below the server's DIR into
        local_dir; return its Job (kind "get") at once.  No name may reach a
        file of protect or the known_hosts file (as Receiver's protect).

        It is a job like a queued tree, on the same connections: each file
        that arrives is a Job of its own (parent: the get's job; name: its
        path below local_dir; result: its FileInfo), reported through the
        same callbacks, and the get's job ends once the server's answer is
        in, "failed" if the server refused it or a file did not arrive.
        """
        job = self._request_job(remote_path, "get")
        if overwrite not in OVERWRITE_POLICIES:
            raise ValueError("overwrite must be one of %s, not %r"
                             % (", ".join(OVERWRITE_POLICIES), overwrite))
        job.path = local_dir
        job.request = (overwrite, _one_or_more(protect) + ((self.known_hosts,) if self.known_hosts
                                                    else ()))
        return self._submit(job)

    def list(self, remote_path="", recursive=False, on_entry=None):
        """Queue a listing of a directory below the server's DIR (its tree
        if recursive); return its Job (kind "list") at once.

        Each entry is an Entry (type, size, mtime_ns, mode, name).  With
        on_entry, on_entry(entry) is called for each as it arrives, through
        the dispatcher (in poll() with dispatch="poll"), and nothing is kept;
        without it, the job's result is the list of them.  It ends "done",
        or "failed" with error set.
        """
        job = self._request_job(remote_path, "list")
        job.request = (recursive, on_entry)
        if on_entry is None:
            job.result = []
        return self._submit(job)

    def _request_job(self, remote_path, kind):
        if self._closing:
            raise XferError("the sender is closed")
        if not isinstance(remote_path, str):
            raise TypeError("remote_path must be a str, not %r" % (remote_path,))
        return Job(self._ledger, None, remote_path, kind)

    def _start_side(self, job, run):
        """Run run() on a thread of its own: its result, or its error, ends job."""
        def body():
            try:
                job.result = run()
                job.state = "done"
            except XferError as e:
                job.error, job.state = e, "failed"
            except Exception as e:   # a bug: end the job rather than leave it "sending"
                traceback.print_exc()
                job.error, job.state = XferError("internal error: %r" % e), "failed"
            job.finished = time.monotonic()
            with self._lock:
                job._done = True
                ended = job._ended
            if ended is not None:
                ended.set()

        threading.Thread(target=body, name="xfer-" + job.kind, daemon=True).start()

    def ping(self):
        """Connect, authenticate and ask for the server's state.

        Returns a dict with version, free and total bytes of DIR, and rtt
        (seconds for the PING round trip).  Blocks; raises XferError.
        A connection that works clears error, as a job's does.
        """
        link = self._dial()
        self._connected()
        try:
            answer = link.ping()
            link.bye()
            return answer
        except _LinkBroken as e:
            raise e.error from None
        finally:
            link.close()

    def ping_async(self):
        """Start a ping() on a thread of its own and return its Job at once.

        The job is "sending" until the receiver answers, then "done" with
        result set to ping()'s dict, or "failed" with error set; a peer that
        is down fails it within connect_timeout, one that accepts and never
        answers within handshake_timeout.  While a ping is in flight, this returns that
        same job, so calling it every frame starts at most one at a time.
        A ping job fires no callbacks and is not waited for by wait() or
        close().  Never blocks: a host's health canary.
        """
        with self._lock:
            job = self._ping
            if job is not None and not job.done:
                return job
            job = Job(self._ledger, None, _host_port_text(self.host, self.port), "ping")
            job.state = "sending"
            job.started = time.monotonic()
            self._ping = job
        self._start_side(job, self.ping)
        return job

    # -- what the caller reads

    @property
    def callback_errors(self):
        return self._dispatch.callback_errors

    @property
    def bytes_kept(self):
        """Bytes of large files cancelled midway, which the receiver keeps for a resume.

        As this side counts them (what it handed to the connection); sending
        such a file again resumes after them.
        """
        return self._ledger.bytes_kept()

    files_done = property(lambda self: self._ledger.files_done)
    files_failed = property(lambda self: self._ledger.files_failed)
    files_skipped = property(lambda self: self._ledger.files_skipped)
    #: files stopped by cancel() or close(wait=False): not failures
    files_cancelled = property(lambda self: self._ledger.files_cancelled)
    bytes_sent = property(lambda self: self._ledger.bytes_sent)
    #: bytes the receiver already had from an interrupted earlier attempt
    bytes_resumed = property(lambda self: self._ledger.bytes_resumed)

    # -- queueing and the feeder thread

    def _submit(self, job):
        if self._closing:
            raise XferError("the sender is closed")
        self._start_threads()
        self._enqueue(job)
        return job

    def _enqueue(self, job):
        """Hand a top-level job to the feeder thread, or raise if close() came first.

        The check and the append are one step under the lock close() takes
        to append the feeder's stop mark, so no job can land behind it (and
        stay queued forever).
        """
        with self._requests_cv:
            if self._closing:
                raise XferError("the sender is closed")
            with self._lock:
                self._ledger.unfinished += 1
                job._epoch = self._epoch
            self._top.add(job)
            self._requests.append(job)
            self._requests_cv.notify()

    def _top_finished(self, job):
        with self._requests_cv:
            self._top.discard(job)

    def _queue_generated(self, name, size):
        """Queue generated bytes under name (bench); returns the Job."""
        job = Job(self._ledger, name, name)
        job.source = _Generated(size)
        job.size = size
        return self._submit(job)

    def _start_threads(self):
        # Started under the lock: close(wait=True) joins only started threads.
        with self._lock:
            if self._threads:
                return
            threads = [threading.Thread(target=self._feed, name="xfer-feeder", daemon=True)]
            for i in range(self.workers):
                threads.append(threading.Thread(target=_Worker(self, i == 0).run,
                                                name="xfer-worker-%d" % i, daemon=True))
            for t in threads:
                t.start()
            self._threads = threads

    def _feed(self):
        """Expand queued requests into file jobs, lazily, into the bounded work queue."""
        while True:
            with self._requests_cv:
                while not self._requests:
                    self._requests_cv.wait()
                job = self._requests.popleft()
            if job is _STOP:
                break
            if job.kind == "dir":
                try:
                    self._walk(job)
                except Exception as e:   # a bug: end the tree's job rather than hang
                    traceback.print_exc()
                    job.failures.append((job.name, XferError("internal error: %r" % e)))
                    self._ledger.part_ended(job)
            else:
                if job.source is None and job.kind == "file":
                    self._stat_job(job)
                self._put([job])
        for _ in range(self.workers):
            self._work.put(_STOP)
        self._nudge()
        self._wide.set()              # the workers still waiting can end

    def _nudge(self):
        """Wake the workers waiting for answers (_Worker._await): work was
        queued, a link's answers came in or it broke, or a tree was sized."""
        with self._stirred:
            self._stirred.notify_all()

    def _put(self, jobs, block=True):
        """Queue a list of jobs: a whole batch per hand-over between threads.
        block=False: False if the queue has no room for it now."""
        if not self._large:
            for job in jobs:
                if job.size > STREAM_MAX:
                    self._large = True
                    self._wide.set()
                    break
        try:
            self._work.put(jobs, block)
        except queue.Full:
            return False
        self._nudge()
        return True

    def _stat_job(self, job):
        """Stat a file job not walked (queued alone, or found by a watch) as it
        is handed to the workers: the one stat a walk makes of each file."""
        try:
            st = os.stat(job.path)
        except OSError:
            return            # _Link._file reports it
        job._stat = st
        self._ledger.resize(job, st.st_size)

    def _queue_found(self, path, name, files):
        """Queue files a watch found as one job, the way a tree is queued:
        files is [(path, name below the receiver's DIR, size)].  Returns (the
        job, the files' jobs); each file is stat'ed as it is handed over."""
        top = Job(self._ledger, path, name, "dir")
        found = []
        for p, n, size in files:
            job = Job(self._ledger, p, n, "file", top)
            job.size = size
            found.append(job)
        top._found = found
        self._submit(top)
        return top, found

    def _walk(self, top):
        """Queue the jobs of a tree, a batch at a time.  A first walk adds up
        the sizes, so the tree's job knows its size and files_total before
        any byte is sent and its progress only rises.  That walk hands on
        its first files as it finds them, where the work queue has room, so
        the receiver is asked about them meanwhile: their endings wait for
        the size (_Ledger.sizing), and no byte of them goes before it."""
        ledger = self._ledger
        waiting = collections.deque()    # lists of jobs not handed on yet
        gathered = [[], 0]               # the list being filled, and its bytes

        def offer(block):
            while waiting:
                jobs = waiting[0]
                ledger.add(top, len(jobs))
                if not self._put(jobs, block):
                    ledger.add(top, -len(jobs))     # no room: tried again later
                    return
                waiting.popleft()

        def gather(job, block):
            jobs = gathered[0]
            jobs.append(job)
            gathered[1] += job.size
            if len(jobs) >= _HANDOVER_FILES or gathered[1] >= _HANDOVER_BYTES:
                waiting.append(jobs)
                gathered[:] = [], 0
                offer(block)

        if top._found is not None:
            top.size, top.files_total = sum(j.size for j in top._found), len(top._found)
            jobs_of = self._stat_found(top._found)
        else:
            cancelled = lambda: top.cancelled

            def found(kind, path, name, st):
                # Never blocks: the workers may not send until the size is known.
                gather(Job(ledger, path, name, "file", top, _Seen(st)) if kind == "file"
                       else Job(ledger, path, name, "mkdir", top), False)
            ledger.sizing(top)
            try:
                top.size, top.files_total, seen = _tree_totals(
                    top.path, top.name, cancelled, self._walk_kept, found)
            finally:
                ledger.sized(top)
                self._nudge()        # a worker waiting to send what was held back
            jobs_of = self._tree_jobs(top, cancelled, seen)
        for job in jobs_of:
            gather(job, True)
        if gathered[0]:
            waiting.append(gathered[0])
        offer(True)
        top._found = None
        ledger.part_ended(top)   # the walk itself is one of the pending parts

    def _stat_found(self, jobs):
        for job in jobs:
            self._stat_job(job)
            yield job

    def _tree_jobs(self, top, cancelled, seen=None):
        """The jobs of top's tree as the walk finds them; a directory that
        cannot be listed ends as a failed job here."""
        ledger = self._ledger
        for kind, path, name, extra in _walk_tree(top.path, top.name, cancelled, seen):
            if kind == "file":
                yield Job(ledger, path, name, "file", top, extra)
            elif kind == "dir":
                yield Job(ledger, path, name, "mkdir", top)
            else:
                ledger.add(top, 1)
                ledger.end(Job(ledger, path, name, "file", top), "failed",
                           XferError("%s: %s" % (path, extra.strerror or extra)))

    def _still_wanted(self, job):
        """End a job that should not be sent any more; True if it should.

        A job queued before the last failed connection fails with it: a
        receiver that is not there fails a whole run at once, not file by
        file.  A job queued after it is sent on a new connection.
        """
        parent = job.parent
        if job._cancel or (parent is not None and parent._cancel):
            self._ledger.end(job, "cancelled", XferError("%s: cancelled" % job.name))
            return False
        error = self.error
        if error is not None and (parent or job)._epoch < self._epoch:
            self._ledger.end(job, "failed", error)
            return False
        return True

    # -- connections and the reconnect schedule

    def _dial(self):
        """Connect, set up TLS if asked, authenticate; return a _Link."""
        host, port = self.host, self.port
        where = _host_port_text(host, port)
        try:
            sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        except socket.gaierror as e:
            raise ConnectError("cannot resolve %s: %s" % (host, e.strerror)) from None
        except socket.timeout:
            raise ConnectError("cannot reach %s: no answer within %ss"
                               % (where, self.connect_timeout)) from None
        except OSError as e:
            raise ConnectError("cannot reach %s: %s" % (where, e.strerror or e)) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.handshake_timeout)
            if self.tls:
                with self._pin_lock:   # one worker at a time records a new pin
                    sock, seen, new = _client_tls(sock, host, port, self.fingerprint,
                                                  self.known_hosts)
                    self.server_fingerprint = seen
                    self.fingerprint_new = self.fingerprint_new or new
                    if new and self.known_hosts:
                        self.fingerprint = seen
                sock = _SharedTls(sock)
            rfile = _Reader(sock, 64 * 1024)
            tags = _client_handshake(sock, rfile, self.token, self.require_server_auth, where)
            sock.settimeout(self.timeout)
        except BaseException as e:
            sock.close()
            if isinstance(e, ConnectionClosedError):
                raise ConnectError("%s closed the connection during the handshake"
                                   % where) from None
            if isinstance(e, socket.timeout):
                raise ConnectError("%s did not answer the handshake within %g s"
                                   % (where, self.handshake_timeout)) from None
            if isinstance(e, OSError) and not isinstance(e, XferError):
                raise ConnectError("%s: %s" % (where, e.strerror or e)) from None
            raise
        return self._link_class(
            sock, rfile, _untagged if tags is None else tags.seal, self._ledger,
            _host_port_text(host, port), refuser=self._refuser, skip=self.skip,
            discard=self.discard, timeout=self.timeout, wanted=self._still_wanted,
            abort=self._abort, nudge=self._nudge)

    def _connect(self):
        """Open a connection; after a failed one, first wait out RECONNECT_DELAYS.

        A failure is counted (sets error); a success clears error.
        """
        with self._retry_cv:
            while True:
                if self._abort.is_set():
                    raise XferError("the sender is closed")
                left = self._retry_at - time.monotonic()
                if left <= 0:
                    break
                self._retry_cv.wait(left)
        started = time.monotonic()
        try:
            link = self._connect_retrying()
        except XferError as e:
            self._connect_failed(e, started)
            raise
        self._connected()
        return link

    def _connect_retrying(self):
        """Open a connection, retrying transient failures with backoff.

        Refused, reset, timed out, busy or shutting down: wait 0.25 s, 0.5 s,
        1 s, ... (each +-50% jitter, at most 4 s) and try again, up to
        `retries` times and never past `retry_window` seconds, so a server
        that is simply not there is reported within about ten seconds.
        Authentication and protocol errors are raised at once.
        """
        deadline = time.monotonic() + self.retry_window
        attempt = 0
        while True:
            try:
                link = self._dial()
                self.connected = True
                return link
            except XferError as e:
                if not e.transient or attempt >= self.retries:
                    raise
                delay = min(4.0, 0.25 * 2 ** attempt) * (0.5 + secrets.randbelow(1001) / 1000.0)
                if time.monotonic() + delay > deadline or self._abort.wait(delay):
                    raise
                attempt += 1

    def _connect_failed(self, error, started):
        """Count a connection that could not be made (retries spent).

        The jobs queued until now fail with error; the next attempt waits
        for the next of RECONNECT_DELAYS.  Workers that fail in the same
        outage (each started before the other's failure) count once.
        """
        if error.transient and not isinstance(error, ConnectError):
            return        # busy or shutting down: the receiver is there
        with self._lock:
            self.error = error
            self._epoch += 1
            now = time.monotonic()
            if self._failed_at < started:
                self._failed_at = now
                self._retry_at = now + RECONNECT_DELAYS[min(self._down,
                                                            len(RECONNECT_DELAYS) - 1)]
                self._down += 1

    def _connected(self):
        """A connection works: error clears and jobs waiting to reconnect go."""
        with self._retry_cv:
            self.error = None
            self._down = 0
            self._retry_cv.notify_all()
            self._retry_at = 0.0


class _LocalRules(Receiver):
    """LOCAL_DIR as a get sees it: a Receiver that is never started, so the
    client applies the very name rules, limits, overwrite policy, temporary
    files and durable publish that a server applies to what it is sent."""

    _side = "this machine"      # the disk a get writes is its user's own

    def __init__(self, local_dir, overwrite="replace", fsync=True, max_size=None, protect=()):
        Receiver.__init__(self, local_dir, overwrite=overwrite, fsync=fsync,
                          max_size=max_size, partial_max_age=None, protect=protect)
        self._prepare_dir()
        self.umask = _current_umask()
        self.got = []           # FileInfo of each file published, in order
        self._held = set()

    # _Store's claims: one connection writes LOCAL_DIR, so a partial is its own.
    def claim(self, key):
        if key in self._held:
            return False
        self._held.add(key)
        return True

    def unclaim(self, key):
        self._held.discard(key)

    def _wants_info(self):
        return True

    def _count_files(self, count, size, resumed=0, resumed_bytes=0, infos=()):
        Receiver._count_files(self, count, size, resumed, resumed_bytes, infos)
        self.got.extend(infos)

    def _log(self, line):
        pass                    # the client reports each failure itself


class _Pull:
    """The client's half of a get (Protocol 4.9), run on the link's reader
    thread: it is the receiver now, and defends itself as one.  Every name
    the server sends passes the local name rules and must lie below the
    path asked for (nothing else is taken: a server cannot plant a file it
    was not asked for); each file goes through _IncomingFile into a _Store
    of LOCAL_DIR, verified, then published durably by the _GroupCommit.

    Each file is a Job below the get's job, counted, reported and ended
    through the Sender's ledger as a file of a sent tree is: on_start when
    its body starts, progress as it arrives, on_done or on_error.
    """

    def __init__(self, link, job):
        self.link = link
        self.top = job
        self.ledger = link.ledger
        self.skip = link.skip
        self.rules = _LocalRules(job.path, overwrite=job.request[0], protect=job.request[1])
        self.store = self.commit = None

    def close(self):
        self.rules._close_dir()

    def frame(self, fid):
        raw = self.top.name.encode("utf-8", "surrogateescape")
        self.base = b"" if raw in (b"", b".") else raw.rstrip(b"/").rsplit(b"/", 1)[-1]
        flags = GF_CHECKSUM if self.skip == "checksum" else 0
        return _frame(_Msg.GET, _GET.pack(fid, flags) + raw)

    def answer(self, fid, first):
        """Take the GET's answer, from its first frame to its DONE; raises
        XferError or OSError if the connection cannot go on."""
        link, rules = self.link, self.rules
        self.rfile = rfile = link.rfile
        self.send = lambda frame: link.sock.sendall(link.seal(frame))
        self.store, self.commit = rules._receiving(rules, link.peer)
        self.held = []              # (incoming, its job), verified, not yet published
        self.stamps = []            # (raw, parts, mode, mtime_ns) of directories to set
        self.unmade = set()         # directories whose MKDIR failed, and said so
        self.digest = None          # (CHECK payload fields) of the FILE that follows
        kind, payload = first
        try:
            while True:
                if self.top.cancelled:      # cancel() or close(wait=False): stop here
                    raise XferError("%s: cancelled" % self.top.name)
                if kind == _Msg.BATCH:
                    self._batch(payload)
                elif kind == _Msg.FILE:
                    self._file(payload)
                elif kind == _Msg.CHECK and self.skip == "checksum" and self.digest is None:
                    self.digest = _decode_check(payload)    # GF_CHECKSUM: the next FILE's
                    if not self.digest[3] & CF_CHECKSUM:
                        raise ProtocolError("CHECK %d from the server without CF_CHECKSUM"
                                            % self.digest[0])
                    kind, payload = rfile.frame(MAX_FRAME_PAYLOAD)
                    continue
                elif kind == _Msg.MKDIR:
                    self._mkdir(payload)
                elif kind == _Msg.ENTRIES:      # a directory's mode and mtime
                    self._dir_entries(payload, fid)
                elif kind == _Msg.RESULT:       # an entry the server did not send
                    _, status, reason = _decode_result(payload)
                    raw = b""
                    if status == ST_SKIPPED:
                        # "NAME: a symlink or special file; not served"
                        # names it, so its Job (-v, --json) does too.
                        name, _, why = reason.rpartition(": ")
                        if name and self._asked(name.encode("utf-8", "surrogateescape")):
                            raw, reason = name.encode("utf-8", "surrogateescape"), why
                    job = self._job(raw)
                    job.note = reason
                    self._end(job, status, reason)
                elif kind == _Msg.DONE:
                    self._commit()
                    error = _decode_done(payload, fid)
                    if error is not None:       # refused as a whole: one failure
                        self.ledger.end(self._job(self.top.name.encode(
                            "utf-8", "surrogateescape"), kind="entry"), "failed", error)
                    self.ledger.part_ended(self.top)
                    return
                elif kind == _Msg.ERROR:
                    raise _unsupported(_decode_error(payload), "get")
                else:
                    raise ProtocolError("unexpected %s in the answer to GET" % _msg_name(kind))
                # Publish what is in before waiting for more, as a receiver
                # answers before it waits: a file is done once it is in.
                if self.held and not rfile.ready():
                    self._commit()
                kind, payload = rfile.frame(MAX_FRAME_PAYLOAD)
        finally:
            try:
                self._commit()
            finally:
                self.store.close()
                self.close()

    def _job(self, raw, size=0, kind="file"):
        """A Job below the get's for an entry of its answer ("entry": the
        failure of the GET as a whole, which is no file of it)."""
        top, ledger = self.top, self.ledger
        job = Job(ledger, None, raw.decode("utf-8", "replace"),
                  "file" if kind == "entry" else kind, top)
        ledger.add(top, 1)
        if kind == "file":
            with ledger.lock:
                top.files_total += 1
            if size:
                ledger.resize(job, size)    # the get's size grows as files are announced
        return job

    def _end(self, job, status, reason):
        if status == ST_SKIPPED:
            self.ledger.end(job, "skipped")
        else:
            self.ledger.end(job, "failed", _error_for(status, reason))

    def _asked(self, raw):
        base = self.base
        return not base or raw == base or raw.startswith(base + b"/")

    def _mkdir(self, payload):
        if len(payload) < _MKDIR.size:
            raise ProtocolError("MKDIR payload of %d bytes is too short" % len(payload))
        fid, _ = _MKDIR.unpack_from(payload)
        raw = payload[_MKDIR.size:]
        try:
            if not self._asked(raw):
                raise UnsafePathError("not below the path asked for; refused", raw)
            self.commit.hold_dir(self.store.makedirs(fid, raw))
        except (XferError, OSError) as e:
            self.unmade.add(raw)
            self._end(self._job(raw, kind="mkdir"), *_failure(raw, e, self.rules._side))

    def _dir_entries(self, payload, fid):
        """A directory's mode and mtime, set at the next commit, once its
        files are in place (renaming them into it changes its mtime)."""
        for etype, _, mtime_ns, mode, raw in _entries(payload, fid):
            if raw in self.unmade:
                continue        # its failure is counted once, at its MKDIR
            try:
                if etype != ET_DIR:
                    raise ProtocolError("ENTRIES in the answer to GET for a non-directory")
                if not self._asked(raw):
                    raise UnsafePathError("not below the path asked for; refused", raw)
                self.stamps.append((raw, self.store.split(raw), mode, mtime_ns))
            except UnsafePathError as e:
                self._end(self._job(raw, kind="mkdir"), *_failure(raw, e, self.rules._side))
        if not self.held:
            self._commit()

    def _file(self, payload):
        """FILE: a large file (ACCEPT, BODY, body, TRAILER), or one streamed."""
        fid, size, mtime_ns, mode, flags, raw = _decode_file(payload)
        if flags & FF_DISCARD:
            raise ProtocolError("FILE %d from the server sets FF_DISCARD" % fid)
        digest = None
        if self.skip == "checksum":
            check, self.digest = self.digest, None
            if check is None or (check[0], check[1], check[5]) != (fid, size, raw):
                raise ProtocolError("FILE %d from the server without its CHECK" % fid)
            digest = check[4]
        stream = bool(flags & FF_STREAM)
        job, sink = self._sink(fid, raw, size, mtime_ns, mode, stream, digest)
        start = 0
        if not stream:
            if sink.failure is not None:        # refused before its body
                self.send(_encode_result(fid, *sink.failure))
                self._end(job, *sink.failure)
                return
            self.send(_frame(_Msg.ACCEPT, _ACCEPT.pack(fid, sink.offset, sink.prefix)))
            try:
                start = _read_body_start(self.rfile, fid, sink.offset)
            except BaseException as e:
                sink.close(keep=True)
                self._cut(job, raw, e)
                raise
        self._body(job, sink, fid, size, start)

    def _batch(self, payload):
        """BATCH (Protocol 4.12): small files, their bodies after it, each
        stored or refused on its own, as a push receiver takes them; the
        server waits for no answer (it has nothing to do with one)."""
        first, entries = _decode_batch(payload)      # every limit, before a body byte
        checksum = self.skip == "checksum"
        for fid, (size, mtime_ns, mode, flags, digest, raw) in enumerate(entries, first):
            if flags & FF_DISCARD:
                raise ProtocolError("BATCH %d from the server sets FF_DISCARD" % first)
            job, sink = self._sink(fid, raw, size, mtime_ns, mode, True,
                                   digest if checksum else None)
            self._body(job, sink, fid, size, their_digest=digest)

    def _sink(self, fid, raw, size, mtime_ns, mode, stream, digest=None):
        """A file's Job, and where its body goes: an _IncomingFile admitted
        into LOCAL_DIR, or a _Drain that reads and drops it with its refusal
        (not asked for, already there, refused by the name rules or the
        overwrite policy), as a push receiver refuses a body."""
        job = self._job(raw, size)
        refusal = None
        try:
            if not self._asked(raw):
                raise UnsafePathError("not below the path asked for; refused", raw)
            if self.skip is not None:
                refusal = self.store.check(raw, size, mtime_ns, digest)
            if refusal is None:
                incoming = self.rules._incoming_class(self.store, fid, raw, size, mtime_ns, mode,
                                                      stream)
                incoming.admit(resumable=not stream)
                return job, incoming
        except (XferError, OSError) as e:
            refusal = _failure(raw, e, self.rules._side)
        job.note = refusal[1] if refusal[0] == ST_SKIPPED else ""
        return job, _Drain(self.store, raw, refusal)

    def _body(self, job, sink, fid, size, start=0, their_digest=None):
        """Receive a body into sink (its TRAILER after it, unless a BATCH gave
        the digest); the file is then held for the commit, or ends."""
        ledger, rfile = self.ledger, self.rfile
        if sink.failure is None:
            ledger.started(job)

        def readinto(view):
            if job.cancelled:
                raise XferError("%s: cancelled" % job.name)
            n = rfile.readinto(view)
            ledger.progress(job, n)
            return n
        try:
            sink.begin(start)
            if start:
                job.resumed = start
                ledger.progress(job, start)
            sink.receive(readinto, size - start)
            aborted = False
            if their_digest is None:
                trailer_flags, their_digest = _read_trailer(rfile, fid)
                aborted = trailer_flags & TF_ABORT
            failure = sink.finish(their_digest, aborted=aborted)
        except BaseException as e:
            # A large file's partial stays for the next get to resume.
            sink.close(keep=sink.in_body)
            self._cut(job, sink.raw, e)
            raise
        if failure is not None:
            if failure[0] == ST_ABORTED:
                failure = (ST_ABORTED, "%s: changed on the server while it was sent; "
                           "not stored (get it again)" % _display(sink.raw))
            self._end(job, *failure)
            return
        self.commit.hold(sink)
        self.held.append((sink, job))
        if sink.claim is not None or len(self.held) >= _HOLD_MAX:
            self._commit()

    def _cut(self, job, raw, e):
        """End job, cut off by e: a connection lost (the get goes again, as
        _Worker._requeue decides) takes it back; anything else fails it."""
        if job.cancelled:
            self.ledger.end(job, "cancelled", XferError("%s: cancelled" % job.name))
        elif isinstance(e, ConnectionError):
            self.ledger.withdraw(job)
        elif isinstance(e, (XferError, OSError)):
            self._end(job, *_failure(raw, e, self.rules._side))

    def _commit(self):
        if self.commit is None:
            return
        self.commit.commit()
        stamps, self.stamps = self.stamps, []
        for raw, parts, mode, mtime_ns in stamps:     # inner directories first
            try:
                self.store.dest.stamp_dir(parts, raw, stat.S_IMODE(mode) & 0o777, mtime_ns)
            except FileNotFoundError:
                pass        # its MKDIR failed, and said so
            except (XferError, OSError) as e:
                self._end(self._job(raw, kind="mkdir"), *_failure(raw, e, self.rules._side))
        held, self.held = self.held, []
        got = iter(self.rules.got)
        self.rules.got = []
        for incoming, job in held:
            incoming.close()
            if incoming.failure is not None:
                self._end(job, *incoming.failure)
                continue
            job.digest = incoming.digest
            job.note = incoming.note or ""
            if incoming.final is None:
                self.ledger.end(job, "skipped")
            else:
                job.result = next(got)
                job.path = job.result.path
                self.ledger.end(job, "done")


class Entry(collections.namedtuple("Entry", "type size mtime_ns mode name")):
    """One entry of a listing (Sender.list): type is "file", "dir", "link" or
    "other"; size in bytes (0 but for files); mtime_ns; mode (permission
    bits); name below the listed directory, "/"-separated."""
    __slots__ = ()


class _Listing:
    """The client's half of a list (Protocol 4.10), run on the link's reader
    thread: each entry goes to the job's on_entry through the dispatcher, or
    into its result, as its ENTRIES frame arrives."""

    _TYPES = {ET_FILE: "file", ET_DIR: "dir", ET_LINK: "link", ET_OTHER: "other"}

    def __init__(self, link, job):
        self.ledger = link.ledger
        self.rfile = link.rfile
        self.job = job

    def close(self):
        pass

    def frame(self, fid):
        recursive = self.job.request[0]
        return _frame(_Msg.LIST, _LIST.pack(fid, LF_RECURSIVE if recursive else 0)
                      + self.job.name.encode("utf-8", "surrogateescape"))

    def answer(self, fid, first):
        job = self.job
        on_entry = job.request[1]
        if on_entry is None:
            keep = job.result.append
        else:
            emit = self.ledger.dispatch.emit
            keep = lambda entry: emit(on_entry, entry)
        types = self._TYPES
        error = _list_entries(self.rfile, fid, lambda t, *rest: keep(
            Entry(types.get(t, "other"), *rest)), first)
        if error is not None:
            self.ledger.end(job, "failed", error)
        else:
            self.ledger.end(job, "done")


def _decode_done(payload, fid):
    """DONE (Protocol 4.9): None, or the error that ended the request."""
    if len(payload) < _DONE.size:
        raise ProtocolError("DONE payload of %d bytes is too short" % len(payload))
    did, status = _DONE.unpack_from(payload)
    if did != fid:
        raise ProtocolError("DONE for request %d while waiting for %d" % (did, fid))
    if status == ST_OK:
        return None
    return _error_for(status, payload[_DONE.size:].decode("utf-8", "replace"))


def _unsupported(error, what):
    """An ERROR answering GET or LIST: from a server older than them, ST_PROTOCOL."""
    if getattr(error, "code", None) == ST_PROTOCOL:
        return ProtocolError("the server does not support %s (upgrade xfer on the server): "
                             "%s" % (what, error))
    return error


def _entries(payload, fid):
    """The entries of an ENTRIES payload (Protocol 4.10) for request fid:
    (type, size, mtime_ns, mode, raw name) tuples."""
    if len(payload) < 4 or struct.unpack_from("!I", payload)[0] != fid:
        raise ProtocolError("ENTRIES for another request")
    at, end = 4, len(payload)
    while at < end:
        if end - at < _ENTRY.size:
            raise ProtocolError("ENTRIES frame ends inside an entry")
        etype, size, mtime_ns, mode, length = _ENTRY.unpack_from(payload, at)
        at += _ENTRY.size
        if at + length > end:
            raise ProtocolError("ENTRIES frame ends inside a name")
        yield etype, size, mtime_ns, mode, payload[at:at + length]
        at += length


def _list_entries(rfile, fid, on_entry, first=None):
    """Read LIST's answer (Protocol 4.10), from its first frame if already
    read: on_entry(type, size, mtime_ns, mode, name) for each entry, as each
    frame arrives; the DONE's error or None."""
    while True:
        kind, payload = first or rfile.frame(MAX_FRAME_PAYLOAD)
        first = None
        if kind == _Msg.DONE:
            return _decode_done(payload, fid)
        if kind == _Msg.ERROR:
            raise _unsupported(_decode_error(payload), "ls")
        if kind != _Msg.ENTRIES:
            raise ProtocolError("unexpected %s in the answer to LIST" % _msg_name(kind))
        for etype, size, mtime_ns, mode, raw in _entries(payload, fid):
            on_entry(etype, size, mtime_ns, mode, raw.decode("utf-8", "replace"))


def _clean_subdir(subdir):
    if not subdir:
        return ""
    return "/".join(p for p in subdir.replace("\\", "/").split("/") if p and p != ".")


def _parse_target(to, port=None):
    """Sender's address: (host, port) or text for _parse_address(); port is
    the default when the text gives none."""
    if isinstance(to, (tuple, list)):
        return to[0], _port_number(to[1])
    if not isinstance(to, str):
        raise TypeError("to must be 'HOST[:PORT]' or a (host, port) pair, not %r" % (to,))
    host, p, _ = _parse_address(to)
    # Checked here too: getaddrinfo takes port 70000 for 4464.
    return host, p if p is not None else _port_number(DEFAULT_PORT if port is None else port)


def _is_destination(operand):
    """True if a command-line operand names a receiver, like scp's HOST:PATH.

    It does if it has a colon with no slash before it; "[V6]..." does too.
    A single letter before the colon is a Windows drive ("C:\\renders"),
    so that operand is a local path.
    """
    if operand.startswith("["):
        return True
    head, colon, _ = operand.partition(":")
    return bool(colon and head and len(head) > 1 and "/" not in head and "\\" not in head)


_Address = collections.namedtuple("_Address", "host port subdir")


def _parse_address(text, dirs=False):
    """The one address parser: an _Address (host, port or None, DIR or "").

    Every command reads an address through it (README "Destinations"):
    HOST[:PORT] (ping, config add, a Sender's to), and with dirs=True
    HOST[:PORT][:DIR] (--to and the last HOST: operand of send).  HOST is an
    alias, a name, an IPv4 address or "[V6]" (brackets dropped); a bare IPv6
    address is taken whole, with no PORT or DIR (anything else with two
    colons is not one: "h:5000:x" is refused, not taken for a host).  PORT is all digits; a
    directory whose name is all digits is written "HOST:2024/".
    """
    what = "destination" if dirs else "address"
    text = str(text).strip()
    if not text:
        raise ConfigError("empty %s" % what)
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ConfigError("bad %s %r: missing ']'" % (what, text))
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ConfigError("bad %s %r" % (what, text))
        shown, rest = text[:end + 1], rest[1:]
    elif text.count(":") > 1 and _is_ip(text):
        return _Address(text, None, "")
    else:
        host, _, rest = text.partition(":")
        shown = host
    if not host:
        raise ConfigError("bad %s %r: no host" % (what, text))
    if not dirs:
        if rest and not rest.isdigit() and (":" in rest or "/" in rest or "\\" in rest):
            # ping pi:renders/, config add box h:5000:renders/: not a bad port
            raise ConfigError("bad address %r: an address is HOST[:PORT], with no directory"
                              % text)
        return _Address(host, _port_number(rest, "port") if rest else None, "")
    port, colon, subdir = rest.partition(":")
    if not (port.isdigit() and (colon or not subdir)):
        port, subdir = "", rest
    where = shown + (":" + port if port else "") + ":"
    if subdir.startswith(("/", "\\")):
        raise ConfigError("%s: DIR is relative to the receiver's directory (its serve --dir), "
                          "never absolute; write %s%s" % (text, where, subdir.lstrip("/\\")))
    if subdir.startswith("~"):
        rest = subdir.replace("\\", "/").partition("/")[2]
        raise ConfigError("%s: xfer has no home directory to expand '~' in; DIR is relative to "
                          "the receiver's directory (its serve --dir): write %s%s"
                          % (text, where, rest))
    parts = [p for p in subdir.replace("\\", "/").split("/") if p and p != "."]
    if ".." in parts:
        raise ConfigError("bad destination %r: '..' would leave the receiver's "
                          "directory" % text)
    return _Address(host, _port_number(port, "port") if port else None, "/".join(parts))


def _is_ip(text):
    """Whether text is an IP address literal (an IPv6 one may carry a %zone)."""
    try:
        ipaddress.ip_address(text.partition("%")[0])
        return True
    except ValueError:
        return False


def _port_number(value, what="port"):
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError("%s must be a number from 0 to 65535, not %r" % (what, value)) from None
    if not 0 <= n <= 65535:
        raise ConfigError("%s must be a number from 0 to 65535, not %r" % (what, value))
    return n


#------------------------------------------------------------
# watching a folder
#------------------------------------------------------------

class WatchEvent(collections.namedtuple("WatchEvent", "kind name job error time")):
    """What a Watch reports through poll().

    kind is one of "started" (always first: name is the folder),
    "pending" (name is new, changed or to be sent again, and waits to be
    complete, or for the receiver), "queued" (handed to the Sender: job is its Job), "sent" (job
    ended "done" or "skipped": the receiver has this version), "changed"
    (it changed while it was sent; it goes again once complete), "failed"
    (error says why; not tried again until it changes), "waiting" (the
    receiver cannot be reached: error says why; files wait for it) and
    "back" (it answers again).  name is the file's path below the watched
    folder with "/" between parts; time is a time.time() value.
    """
    __slots__ = ()


def _name_patterns(patterns):
    """Two compiled expressions for fnmatch patterns: one for those matched
    against a base name, one for those with a "/", matched against the path
    below the folder.  Either matches nothing when it has no pattern."""
    names, paths = [], []
    for pattern in patterns:
        (paths if "/" in pattern else names).append(
            "(?:%s)" % fnmatch.translate(os.path.normcase(pattern)))
    return tuple(re.compile("|".join(group) if group else "(?!)") for group in (names, paths))


class _Inotify:
    """Linux inotify through ctypes: which directories and files changed, and
    which files a writer has open (modified since their last close).

    A fast path only: open() gives None on other systems or without libc,
    and add() False when the kernel refuses a watch (its per-user limit);
    the Watch then polls as it does everywhere else.  Events are read
    without blocking at each look; a lost event (the kernel's queue
    overflowed) asks for a full look.
    """

    # IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO,
    # IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF (<sys/inotify.h>)
    MASK = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800
    MODIFY, CLOSE_WRITE, Q_OVERFLOW, IGNORED = 0x2, 0x8, 0x4000, 0x8000
    GONE = 0x40 | 0x200             # moved away or deleted
    LISTED = GONE | 0x80 | 0x100    # ... or moved in or created
    _EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then len bytes of name

    @classmethod
    def open(cls):
        if not sys.platform.startswith("linux"):
            return None
        try:
            import ctypes
            import ctypes.util
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (OSError, AttributeError, ImportError):
            return None
        return cls(libc, ctypes, fd) if fd >= 0 else None

    def __init__(self, libc, ctypes, fd):
        self._libc = libc
        self._ctypes = ctypes
        self.fd = fd
        self.writing = set()    # files modified and not closed since
        self._dirs = {}         # watch descriptor -> directory name below the folder
        self._wds = {}          # and back

    def add(self, name, path):
        """Watch one directory; False if the kernel refuses (the caller polls)."""
        if name in self._wds:
            return True
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), self.MASK)
        if wd < 0:
            # Gone already: its parent's listing forgets it.
            return self._ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR)
        self._dirs[wd] = name
        self._wds[name] = wd
        return True

    def remove(self, name):
        wd = self._wds.pop(name, None)
        if wd is not None and self._dirs.get(wd) == name:   # not moved to another name
            del self._dirs[wd]
            self._libc.inotify_rm_watch(self.fd, wd)

    def read(self):
        """(directories to list, files to stat, lost) since the last call."""
        dirs, files, lost = set(), set(), False
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                break
            except OSError:
                lost = True
                break
            offset = 0
            while offset + self._EVENT.size <= len(data):
                wd, mask, _, size = self._EVENT.unpack_from(data, offset)
                offset += self._EVENT.size
                raw = data[offset:offset + size].rstrip(b"\0")
                offset += size
                if mask & self.Q_OVERFLOW:
                    lost = True
                top = self._dirs.get(wd)
                if mask & self.IGNORED and top is not None:
                    del self._dirs[wd]
                    if self._wds.get(top) == wd:
                        del self._wds[top]
                if top is None:
                    continue
                if not raw or mask & self.LISTED:
                    dirs.add(top)           # names came or went: list it
                if not raw:
                    continue
                name = os.fsdecode(raw)
                name = top + "/" + name if top else name
                files.add(name)
                if mask & self.MODIFY:
                    self.writing.add(name)
                elif mask & (self.CLOSE_WRITE | self.GONE):
                    self.writing.discard(name)
        return dirs, files, lost

    def close(self):
        try:
            os.close(self.fd)
        except OSError:
            pass


def _have_key(key):
    """(size, mtime_ns) as one int (sizes are below 2**64)."""
    return key[1] << 64 | key[0]


class Watch:
    """A folder a Sender watches: see Sender.watch() and README "Watching a folder".

    A thread of its own looks at the folder every interval seconds and
    queues on the Sender each file that is new or changed once it is
    complete.  poll() returns what happened and never blocks; stop() ends
    it.  Read-only, from any thread: files_sent, files_skipped,
    files_failed, bytes_sent, pending (files seen and not yet sent), last
    (the name of the last file sent) and last_time (its time.time()),
    waiting (the error while the receiver cannot be reached, else None),
    looks (how many looks are done), stopped (True once stop() has finished).

    notify (tests) opens the inotify fast path, on the watching thread; one
    that gives None makes the watch poll, as it does where there is no inotify.
    """

    def __init__(self, sender, path, subdir=None, settle=DEFAULT_SETTLE,
                 interval=WATCH_INTERVAL, rescan=WATCH_RESCAN, include=(), exclude=(),
                 notify=_Inotify.open):
        self.sender = sender
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            raise XferError("%s: not a directory" % path)
        base = os.path.basename(self.path)
        if not base:
            raise XferError("%s: watch a folder, not the root directory" % path)
        #: where the folder lands on the receiver, as send-dir puts it
        self.name = "/".join(p for p in (_clean_subdir(subdir), base) if p)
        self.settle = _seconds_given("settle", settle, zero=True, none=False)
        self.interval = max(0.01, _seconds_given("interval", interval, none=False))
        self.rescan = max(self.interval, _seconds_given("rescan", rescan, none=False))
        self.include = _one_or_more(include)
        self.exclude = WATCH_IGNORE + _one_or_more(exclude)
        self._skip = _name_patterns(self.exclude)
        self._only = _name_patterns(self.include)
        self.files_sent = 0
        self.files_skipped = 0
        self.files_failed = 0
        self.bytes_sent = 0
        self.last = None
        self.last_time = None
        self.waiting = None
        self.stopped = False
        self.looks = 0
        self._events = collections.deque(maxlen=WATCH_EVENTS_MAX)
        self._seen = {}       # name -> ((size, mtime_ns), monotonic time first seen so)
        # name -> _have_key((size, mtime_ns)) sent, or failed: not tried again;
        # one int, not a tuple: this one holds every file seen
        self._have = {}
        self._pending = set() # names seen, not yet complete (stat'ed at each look)
        # name -> (size, mtime_ns): complete, waiting for room on the Sender
        self._ready = collections.OrderedDict()
        self._flight = {}     # name -> (Job, (size, mtime_ns) judged complete)
        self._dirs = {}       # dir name ("" for the folder) -> [mtime_ns, files, subdirs]
        self._ping = None
        self._next_ping = 0.0
        self._pings = 0
        # Opened on the watching thread: loading libc through ctypes takes
        # tens of milliseconds, a host's frame or three on the caller's.
        self._open_notify = notify
        self._notify = None
        self._stop = threading.Event()
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name="xfer-watch", daemon=True)
        self._thread.start()

    @property
    def pending(self):
        return len(self._pending) + len(self._ready) + len(self._flight)

    def poll(self, max_events=None):
        """Return the WatchEvents since the last call (at most max_events); never blocks."""
        events = []
        while self._events and (max_events is None or len(events) < max_events):
            try:
                events.append(self._events.popleft())
            except IndexError:
                break
        return events

    def stop(self, wait=True):
        """Stop watching: nothing more is queued, and files queued but not started
        are cancelled.  A file in flight finishes (its event still comes through
        poll()).  wait=True blocks until it has; wait=False returns at once.
        Safe to call more than once."""
        self._stop.set()
        if wait and self._thread is not threading.current_thread():
            self._ended.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<Watch %r %d sent %d pending>" % (self.path, self.files_sent, self.pending)

    # -- the watching thread

    def _run(self):
        try:
            self._notify = self._open_notify()
            rescan_at = look_at = 0.0
            self._emit("started", self.path)
            while not self._stop.is_set():
                now = time.monotonic()
                look = now >= look_at
                more = False
                try:
                    self._collect()
                    if look:
                        full = now >= rescan_at
                        if full:
                            rescan_at = now + (self.rescan if self._notify is None
                                               else max(self.rescan, WATCH_RESCAN_NOTIFIED))
                        self._look(full)
                        self._check_peer()
                    more = self._queue_complete()
                except XferError:
                    break                   # the Sender was closed
                except Exception:           # a bug: say so, keep watching
                    traceback.print_exc()
                if look:
                    self.looks += 1
                    look_at = now + self.interval
                # More complete files than may wait on the Sender: top the
                # queue up as it drains, and look again on schedule.
                self._stop.wait(WATCH_REFILL if more else max(0.0, look_at - time.monotonic()))
            for job, _ in list(self._flight.values()):
                if job.state == "queued":
                    job.cancel()
            while self._flight:
                self._collect()
                if self._flight:
                    self._ended.wait(0.05)
        finally:
            if self._notify is not None:
                self._notify.close()
            self.stopped = True
            self._ended.set()

    def _emit(self, kind, name, job=None, error=None):
        self._events.append(WatchEvent(kind, name, job, error, time.time()))

    def _local(self, name):
        return os.path.join(self.path, *name.split("/")) if name else self.path

    def _wanted(self, name, is_dir, path):
        """Whether a name found in a look is watched (exclude, then include)."""
        name, path = os.path.normcase(name), os.path.normcase(path)
        if self._skip[0].match(name) or self._skip[1].match(path):
            return False
        return (is_dir or not self.include or self._only[0].match(name) is not None
                or self._only[1].match(path) is not None)

    def _look(self, full):
        """Stat the directories (each, or every file on a full look) and the
        files not yet sent; list the directories that changed."""
        wall = time.time()
        observed = set()
        if self._notify is not None:
            dirs, files, lost = self._notify.read()
            full = full or lost
        if full:
            stack = [""]
        elif self._notify is not None:
            stack = [name for name in dirs if name in self._dirs]
            for name in files:
                top, _, base = name.rpartition("/")
                entry = self._dirs.get(top)
                if entry is not None and base in entry[1]:
                    try:
                        self._observe(name, os.stat(self._local(name)))
                        observed.add(name)
                    except OSError:
                        self._forget(name)
        else:
            stack = []
            for name in list(self._dirs):
                try:
                    st = os.stat(self._local(name))
                except OSError:
                    self._forget_dir(name)
                    continue
                entry = self._dirs.get(name)
                if (entry is not None and entry[0] == st.st_mtime_ns
                        and wall - st.st_mtime_ns / 1e9 >= _WATCH_RECENT):
                    continue
                stack.append(name)
        if "" not in self._dirs and "" not in stack:
            # The folder itself is gone (or could not be listed): nothing
            # above it is watched, so look for it again at every look, not
            # only at the next full one, to take it up once it is made again.
            stack.append("")
        while stack:
            name = stack.pop()
            stack.extend(self._list(name, full, observed))
        for name in list(self._pending):
            if name in observed:
                continue
            try:
                self._observe(name, os.stat(self._local(name)))
            except OSError:
                self._forget(name)

    def _list(self, top, full, observed):
        """List one directory: note new and (full) all files, forget the gone;
        return the subdirectories to list now."""
        if self._notify is not None and not self._notify.add(top, self._local(top)):
            self._notify.close()            # the kernel's limit: poll from now on
            self._notify = None
        try:
            st = os.stat(self._local(top))
            entries = []
            with os.scandir(self._local(top)) as it:
                for entry in it:
                    entries.append(entry)
        except OSError:
            self._forget_dir(top)
            return []
        old = self._dirs.get(top) or [0, set(), set()]
        files, subdirs = set(), set()
        for entry in entries:
            name = top + "/" + entry.name if top else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if entry.name in old[2] or self._wanted(entry.name, True, name):
                        subdirs.add(entry.name)
                    continue
                if not entry.is_file() or (entry.name not in old[1]
                                           and not self._wanted(entry.name, False, name)):
                    continue
                files.add(entry.name)
                if full or entry.name not in old[1] or (name in self._pending
                                                         and name not in observed):
                    self._observe(name, entry.stat())
                    observed.add(name)
            except OSError:
                continue
        for gone in old[1] - files:
            self._forget(top + "/" + gone if top else gone)
        for gone in old[2] - subdirs:
            self._forget_dir(top + "/" + gone if top else gone)
        self._dirs[top] = [st.st_mtime_ns, files, subdirs]
        return [top + "/" + d if top else d for d in (subdirs if full else subdirs - old[2])]

    def _observe(self, name, st):
        key = (st.st_size, st.st_mtime_ns)
        ready = self._ready.get(name)
        if ready == key:
            return                          # complete, waiting for room on the Sender
        if ready is not None:
            del self._ready[name]           # changed while it waited: it settles again
            self._pending.add(name)
        elif name not in self._flight and name not in self._pending:
            if self._have.get(name) == _have_key(key):
                return                      # sent as it is: nothing to time
            self._emit("pending", name)
            if (time.time() - key[1] / 1e9 >= self.settle
                    and (self._notify is None or name not in self._notify.writing)):
                # Complete already (a first look's files): nothing to time,
                # and nothing held per file but this.
                self._ready[name] = key
                return
            self._pending.add(name)
        seen = self._seen.get(name)
        if seen is None or seen[0] != key:
            self._seen[name] = (key, time.monotonic())

    def _forget(self, name):
        """A file went away: deletions are not sent; a new file of that name is new."""
        self._seen.pop(name, None)
        self._have.pop(name, None)
        self._pending.discard(name)
        self._ready.pop(name, None)

    def _forget_dir(self, top):
        entry = self._dirs.pop(top, None)
        if self._notify is not None:
            self._notify.remove(top)
        if entry is None:
            return
        for name in entry[1]:
            self._forget(top + "/" + name if top else name)
        for sub in entry[2]:
            self._forget_dir(top + "/" + sub if top else sub)

    def _queue_complete(self):
        """Queue the files that are complete: their size and mtime have stayed
        the same for settle seconds (by the mtime, or as seen here when that
        lies in the future).  At most WATCH_QUEUED_MAX wait on the Sender; the
        rest wait in order, not stat'ed again until they go (the Sender stats
        each as it takes it, and _collect sees a change).  Returns True while
        some are waiting for room."""
        now, wall = time.monotonic(), time.time()
        if self.waiting is not None:
            return False
        complete = []
        for name in self._pending:
            key, since = self._seen[name]
            if now - since < self.settle and wall - key[1] / 1e9 < self.settle:
                continue
            if (self._notify is not None and name in self._notify.writing
                    and now - since < WATCH_OPEN_MAX):
                continue                    # a writer has it open
            complete.append(name)
        for name in complete:
            self._pending.discard(name)
            self._ready[name] = self._seen.pop(name)[0]
        room = WATCH_QUEUED_MAX - len(self._flight)
        ready = []
        while self._ready and len(ready) < room:
            ready.append(self._ready.popitem(last=False))
        self._queue(ready)
        # A set or dict keeps the table it grew to (a first look's thousands
        # of names) after it is emptied: start the empty ones afresh.
        if not self._pending:
            self._pending = set()
        if not self._ready:
            self._ready = collections.OrderedDict()
        if not self._seen:
            self._seen = {}
        return bool(self._ready)

    def _queue(self, ready):
        """Queue [(name, (size, mtime_ns))]: several as one job, as send-dir
        queues a tree (the first look's files, a burst); one alone."""
        if not ready:
            return
        if len(ready) == 1:
            name, _ = ready[0]
            jobs = [self.sender.queue(self._local(name), target_name=name, subdir=self.name)]
        else:
            _, jobs = self.sender._queue_found(self.path, self.name, [
                (self._local(name), self.name + "/" + name, key[0]) for name, key in ready])
        for (name, key), job in zip(ready, jobs):
            self._flight[name] = (job, key)
            self._emit("queued", name, job)

    def _collect(self):
        """Take in the files the Sender has ended."""
        for name, (job, key) in list(self._flight.items()):
            if not job.done:
                continue
            del self._flight[name]
            try:
                st = os.stat(self._local(name))
                changed = (st.st_size, st.st_mtime_ns) != key
            except OSError:
                st, changed = None, False       # gone since: deletions are not sent
            if st is None and job.state not in ("done", "skipped"):
                self._forget(name)              # it failed for being gone
            elif changed:
                # It was written to while it was sent: what arrived may be
                # torn (a trailer abort stored nothing); it goes again once
                # it settles.
                self._emit("changed", name, job, job.error)
                self._observe(name, st)
            elif job.state in ("done", "skipped"):
                self._have[name] = _have_key(key)
                self._seen.pop(name, None)      # timed only until it is sent
                if job.state == "done":
                    self.files_sent += 1
                    self.bytes_sent += job.size - job.resumed
                    self.last, self.last_time = name, time.time()
                else:
                    self.files_skipped += 1
                self._emit("sent", name, job)
            elif job.state == "cancelled" or self._unreachable(job.error):
                if st is not None:
                    self._observe(name, st)
                if job.state != "cancelled":
                    self._wait_for_peer(job.error)
            else:
                self._have[name] = _have_key(key)
                self._seen.pop(name, None)
                self.files_failed += 1
                self._emit("failed", name, job, job.error)

    def _unreachable(self, error):
        """True if error is about the connection, not the file: it goes again."""
        return (self.sender.error is not None or isinstance(error, ConnectionError)
                or getattr(error, "transient", False))

    def _wait_for_peer(self, error):
        if self.waiting is None:
            self.waiting = self.sender.error or error
            self._pings = 1
            self._next_ping = time.monotonic() + RECONNECT_DELAYS[0]
            self._emit("waiting", None, error=self.waiting)

    def _check_peer(self):
        """While waiting: ping on the RECONNECT_DELAYS schedule until it answers."""
        if self.waiting is None:
            return
        job = self._ping
        if job is not None and job.done:
            self._ping = None
            if job.state == "done":
                self.waiting = None
                self._emit("back", None)
                return
            self.waiting = job.error or self.waiting
        now = time.monotonic()
        if self._ping is None and now >= self._next_ping:
            self._ping = self.sender.ping_async()
            self._next_ping = now + RECONNECT_DELAYS[min(self._pings,
                                                         len(RECONNECT_DELAYS) - 1)]
            self._pings += 1


#------------------------------------------------------------
# discovery (Protocol 7)
#------------------------------------------------------------
# Query and answer over UDP on the server's port number.  A server answers
# queries and never announces itself.  An answer is never longer than the
# query it answers, so a forged source address gains an attacker nothing.

_DISCOVER_MAGIC = b"XFRD"
_DISCOVER_HEAD = struct.Struct("!4sBH16s")   # magic, kind, version, nonce   (Protocol 7)
_DISCOVER_ANSWER = struct.Struct("!HB")      # TCP port, flags; name NUL version follow
_DISCOVER_SIZE = 128                         # a query's exact size, zero padded
_DQ_QUERY, _DQ_ANSWER = 0x01, 0x02
DF_PAIRING = 0x01       # a pairing code is open
DF_TLS = 0x02           # the server requires TLS
DF_AUTH = 0x04          # the server requires a token
_DF_KNOWN = DF_PAIRING | DF_TLS | DF_AUTH
_NAME_MAX = 63          # bytes of the server's name in an answer
#: find, pair and --code: seconds to wait for answers (to broadcasts: all of it)
DISCOVER_WAIT = 1.0


def _server_name(text=None, hostname=None):
    """An alias-shaped name for this machine: its host name (hostname, tests:
    another machine's), lower case, letters, digits, '-' and '_' only;
    "server" if nothing is left."""
    if text is None:
        text = (hostname or socket.gethostname()).split(".")[0]
    name = "".join(c for c in text.lower() if c.isalnum() or c in "-_")
    name = name.encode("utf-8")[:_NAME_MAX].decode("utf-8", "ignore")
    return "server" if name in ("", "serve", "default") else name


def _discover_query(nonce):
    return _DISCOVER_HEAD.pack(_DISCOVER_MAGIC, _DQ_QUERY, PROTOCOL_VERSION,
                               nonce).ljust(_DISCOVER_SIZE, b"\0")


def _discover_answer(nonce, port, flags, name):
    answer = (_DISCOVER_HEAD.pack(_DISCOVER_MAGIC, _DQ_ANSWER, PROTOCOL_VERSION, nonce)
              + _DISCOVER_ANSWER.pack(port, flags)
              + name.encode("utf-8")[:_NAME_MAX] + b"\0" + __version__.encode("ascii"))
    return answer[:_DISCOVER_SIZE]


def _read_answer(data, nonce):
    """(version, port, flags, name, version text) from an answer to nonce, or None."""
    head = _DISCOVER_HEAD.size + _DISCOVER_ANSWER.size
    if len(data) < head or len(data) > _DISCOVER_SIZE:
        return None
    magic, kind, version, got = _DISCOVER_HEAD.unpack_from(data)
    if magic != _DISCOVER_MAGIC or kind != _DQ_ANSWER or got != nonce:
        return None
    port, flags = _DISCOVER_ANSWER.unpack_from(data, _DISCOVER_HEAD.size)
    name, _, text = data[head:].partition(b"\0")
    return (version, port, flags & _DF_KNOWN, name.decode("utf-8", "replace"),
            text.decode("utf-8", "replace"))


class _Discovery:
    """The receiver's discovery responder: a thread answering queries on UDP."""

    def __init__(self, receiver, address):
        self.receiver = receiver
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6 and address[0] in ("::", ""):
                try:    # answer IPv4 queries too where the system allows
                    self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except (OSError, AttributeError):
                    pass
            self.sock.bind(address[:2])
        except OSError:
            self.sock.close()
            raise
        self.sock.settimeout(0.1)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="xfer-discovery", daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            try:
                data, peer = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                if self.stopping:
                    return
                continue
            if len(data) != _DISCOVER_SIZE or not peer[1]:
                continue
            magic, kind, _, nonce = _DISCOVER_HEAD.unpack_from(data)
            if magic != _DISCOVER_MAGIC or kind != _DQ_QUERY:
                continue
            try:
                self.sock.sendto(self.receiver._discover_answer(nonce), peer)
            except OSError:
                pass

    def stop(self):
        self.stopping = True
        self.thread.join(1.0)
        self.sock.close()


def _discover_targets(environ=None, port=DEFAULT_PORT):
    """Where find, pair and --code send a query: the addresses in
    XFER_DISCOVER_ADDR (HOST[:PORT], comma separated) if set, else the IPv4
    limited broadcast (255.255.255.255, which leaves by the default route
    only), the directed broadcast address of each IPv4 interface, and IPv6
    all-nodes link-local multicast (ff02::1) on each interface.
    Returns ([(family, sockaddr)], broadcast?)."""
    environ = os.environ if environ is None else environ
    spec = environ.get("XFER_DISCOVER_ADDR", "").strip()
    targets = []
    if spec:
        for item in spec.split(","):
            host, p = _parse_target(item.strip(), port)
            try:
                infos = socket.getaddrinfo(host, p, 0, socket.SOCK_DGRAM)
            except socket.gaierror as e:
                raise ConfigError("XFER_DISCOVER_ADDR: cannot resolve %s: %s"
                                  % (host, e.strerror)) from None
            targets.append((infos[0][0], infos[0][4]))
        return targets, False
    targets.append((socket.AF_INET, ("255.255.255.255", port)))
    targets.extend((socket.AF_INET, (address, port)) for address in _interface_broadcasts())
    if socket.has_ipv6 and hasattr(socket, "if_nameindex"):
        try:
            for index, name in socket.if_nameindex():
                if name != "lo":
                    targets.append((socket.AF_INET6, ("ff02::1", port, 0, index)))
        except OSError:
            pass
    return targets, True


def _discover(wait=DISCOVER_WAIT, port=DEFAULT_PORT, environ=None):
    """Ask the LAN which xfer servers there are; a list of dicts, one per answer.

    Keys: name, host, port, version, protocol, pairing, tls, auth.  Waits up
    to wait seconds; for the addresses of XFER_DISCOVER_ADDR only until each
    has answered or refused (a connected socket hears the ICMP refusal).
    Answers carry no secret, and nothing in them is trusted beyond choosing
    where to connect.
    """
    targets, broadcast = _discover_targets(environ, port)
    nonce = secrets.token_bytes(16)
    query = _discover_query(nonce)
    selector = _Selector()
    socks = []
    failed = []         # (address, reason) of each target the query could not go to
    try:
        for family, sockaddr in targets:
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
                socks.append(sock)
                if broadcast:
                    if family == socket.AF_INET:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                    sock.sendto(query, sockaddr)
                else:
                    sock.connect(sockaddr)
                    sock.send(query)
            except OSError as e:        # one target failing must not hide the others
                failed.append((sockaddr[0], e.strerror or str(e)))
                continue
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        if failed and not selector.get_map():
            reasons = []
            for address, reason in failed:
                if (address, reason) not in reasons:
                    reasons.append((address, reason))
            raise ConnectError("the discovery query could not be sent (%s)" % ", ".join(
                "%s: %s" % item for item in reasons))
        found = []
        pending = len(selector.get_map())
        deadline = time.monotonic() + wait
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in selector.select(left):
                try:
                    data, peer = key.fileobj.recvfrom(2048)
                except BlockingIOError:
                    continue
                except OSError:             # refused: nothing listens there
                    selector.unregister(key.fileobj)
                    pending -= 1
                    continue
                answer = _read_answer(data, nonce)
                if answer is None:
                    continue
                if not broadcast:
                    selector.unregister(key.fileobj)
                    pending -= 1
                protocol, tcp_port, flags, name, version = answer
                host = peer[0]
                if host.startswith("::ffff:"):     # IPv4 through a dual-stack socket
                    host = host[7:]
                if all((e["host"], e["port"]) != (host, tcp_port) for e in found):
                    found.append(dict(name=name, host=host, port=tcp_port, version=version,
                                      protocol=protocol, pairing=bool(flags & DF_PAIRING),
                                      tls=bool(flags & DF_TLS), auth=bool(flags & DF_AUTH)))
        return found
    finally:
        selector.close()
        for sock in socks:
            sock.close()


#------------------------------------------------------------
# configuration
#------------------------------------------------------------

def config_paths(environ=None, cwd=None, local=False):
    """Config files searched, highest precedence first (README "Configuration").

    No command reads one from the working directory: someone who runs send
    inside a directory that received files must not be redirected by a
    planted xfer.ini (README "Security").  local=True, a library caller's
    explicit choice, adds cwd's xfer.ini after $XFER_CONFIG.
    """
    environ = os.environ if environ is None else environ
    paths = []
    if environ.get("XFER_CONFIG"):
        paths.append(environ["XFER_CONFIG"])
    if local:
        paths.append(os.path.join(os.getcwd() if cwd is None else cwd, "xfer.ini"))
    paths.append(user_config_path(environ))
    return paths


def user_config_path(environ=None):
    """The per-user config file of this OS."""
    environ = os.environ if environ is None else environ
    if os.name == "nt":
        base = environ.get("APPDATA") or os.path.join(os.path.expanduser("~"), "AppData",
                                                      "Roaming")
    elif sys.platform == "darwin":
        base = os.path.join(os.path.expanduser("~"), "Library", "Application Support")
    else:
        base = environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"),
                                                              ".config")
    return os.path.join(base, "xfer", "xfer.ini")


class Config:
    """Merged settings from the config files and a legacy serverinfo.py.

    sections maps a section name ("DEFAULT", "serve" or a host alias) to a
    dict of key -> (value, path, lineno).
    """

    def __init__(self):
        self.sections = {"DEFAULT": {}}
        self.files = []
        self.serverinfo = None   # (host, port, path) from serverinfo.py
        #: one line each, for the command line to print: e.g. a token others can read
        self.warnings = []

    def get(self, section, key):
        """Return (value, path, lineno) from section, falling back to DEFAULT."""
        for name in (section, "DEFAULT"):
            entry = self.sections.get(name, {}).get(key)
            if entry is not None:
                return entry
        return None

    def value(self, section, key, default=None):
        entry = self.get(section, key)
        return default if entry is None else entry[0]

    def own(self, section, key):
        """(value, path, lineno) set in section itself, never from DEFAULT, or None."""
        if section == "DEFAULT":
            return None
        return self.sections.get(section, {}).get(key)

    def aliases(self):
        return sorted(n for n in self.sections if n not in ("DEFAULT", "serve"))

    def port(self, section):
        entry = self.get(section, "port")
        if entry is None:
            return None
        try:
            return _port_number(entry[0])
        except ConfigError as e:
            raise ConfigError(str(e), entry[1], entry[2], "port") from None

    def int_value(self, section, key):
        entry = self.get(section, key)
        if entry is None:
            return None
        try:
            return int(entry[0])
        except ValueError:
            raise ConfigError("must be a whole number, not %r" % entry[0],
                              entry[1], entry[2], key) from None

    def _merge(self, path, parser, linenos):
        for section in ["DEFAULT"] + parser.sections():
            items = parser.defaults() if section == "DEFAULT" else \
                parser._sections[section]  # own keys only, not the DEFAULTs
            target = self.sections.setdefault(section, {})
            for key, value in items.items():
                target.setdefault(key, (value, path, linenos.get((section, key))))


_KNOWN_KEYS = frozenset(["host", "port", "token", "dir", "to", "workers", "max_connections",
                         "max_size", "portable_names", "tls", "tls_cert", "tls_key",
                         "fingerprint", "no_auth", "overwrite", "allow_home", "allow_get",
                         "no_discovery", "web"])


def load_config(path=None, environ=None, cwd=None, local=False, serverinfo=True):
    """Read the config files and serverinfo.py; return a Config.

    path: an explicit file (--config); it must exist.  Otherwise every file
    of config_paths() that exists is read; earlier files win key by key;
    $XFER_CONFIG, when set, must exist.  A path or $XFER_CONFIG ending in
    ".py" is a legacy serverinfo.py; otherwise serverinfo.py is read from
    the per-user folder (beside its xfer.ini), never from the working
    directory unless local=True.  serverinfo=False (serve) reads none.
    Raises ConfigError naming file, line and key.
    """
    environ = os.environ if environ is None else environ
    config = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError("config file not found", path)
        paths = [path]
    else:
        named = environ.get("XFER_CONFIG")
        if named and not os.path.isfile(named):
            raise ConfigError("config file not found (set in XFER_CONFIG)", named)
        paths = [p for p in config_paths(environ, cwd, local) if os.path.isfile(p)]
    for p in paths:
        if not p.endswith(".py"):
            _read_ini(config, p)
    infos = [p for p in paths if p.endswith(".py")]
    if path is None:
        if local:
            infos.append(os.path.join(os.getcwd() if cwd is None else cwd, "serverinfo.py"))
        infos.append(_user_serverinfo_path(environ))
    infos = [p for p in infos if os.path.isfile(p)]
    if serverinfo and infos:
        config.serverinfo = _read_serverinfo(infos[0])
    return config


def _user_serverinfo_path(environ=None):
    """The legacy serverinfo.py read beside the per-user config file."""
    return os.path.join(os.path.dirname(user_config_path(environ)), "serverinfo.py")


def _read_ini(config, path):
    parser = configparser.ConfigParser(interpolation=None)
    try:
        # utf-8-sig: Windows Notepad may begin the file with a byte order mark.
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
        parser.read_string(text, source=path)
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path) from None
    except OSError as e:
        raise ConfigError(e.strerror or str(e), path) from None
    except configparser.MissingSectionHeaderError as e:
        # Before ParsingError, its base, whose list of errors it does not have.
        raise ConfigError("missing [section] header before %s" % e.line.strip(),
                          path, e.lineno) from None
    except configparser.ParsingError as e:
        lineno = e.errors[0][0]         # its line is given as a repr, newline and all
        raise ConfigError("cannot parse %r" % text.splitlines()[lineno - 1].strip(),
                          path, lineno) from None
    except (configparser.DuplicateOptionError, configparser.DuplicateSectionError) as e:
        key = getattr(e, "option", None)
        raise ConfigError("duplicate %s" % ("key" if key else "section %r" % e.section),
                          path, e.lineno, key) from None
    except configparser.Error as e:
        raise ConfigError(str(e).splitlines()[0], path) from None
    linenos = _ini_linenos(text)
    for section in ["DEFAULT"] + parser.sections():
        keys = parser.defaults() if section == "DEFAULT" else parser._sections[section]
        for key in keys:
            if key not in _KNOWN_KEYS:
                raise ConfigError("unknown key (known: %s)" % ", ".join(sorted(_KNOWN_KEYS)),
                                  path, linenos.get((section, key)), key)
    config.files.append(path)
    config._merge(path, parser, linenos)
    if "token" in parser.defaults() or any("token" in parser._sections[s]
                                           for s in parser.sections()):
        _check_private(config, path)


def _check_private(config, path):
    """Warn when a file holding a token can be read or changed by other users."""
    if os.name == "nt":
        return          # no mode bits; the per-user folder is private by default
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    if mode & 0o077:
        config.warnings.append("%s holds a token and other users can read or change it "
                               "(mode %04o): chmod 600 %s" % (path, mode, path))


def _ini_linenos(text):
    """Map (section, key) to the line number where it is set."""
    linenos = {}
    section = "DEFAULT"
    indent = None       # of the section's last key; None before its first
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        level = len(line) - len(line.lstrip())
        if indent is not None and level > indent:
            continue  # continuation line, as configparser reads one
        if s.startswith("[") and s.endswith("]"):
            section, indent = s[1:-1].strip(), None
            continue
        for sep in ("=", ":"):
            if sep in s:
                key = s.split(sep, 1)[0].strip().lower()
                linenos.setdefault((section, key), n)
                indent = level
                break
    return linenos


def _read_serverinfo(path):
    """Read (host, port) from a legacy serverinfo.py without executing it.

    Accepts a tuple assignment such as SERVER = ("192.168.1.20", 5001) or
    separate host/ip and port assignments.  Returns (host, port, path).
    """
    try:
        with open(path, encoding="utf-8-sig") as f:    # as an INI file, BOM or not
            tree = ast.parse(f.read(), filename=path)
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", path) from None
    except OSError as e:
        raise ConfigError(e.strerror or str(e), path) from None
    except SyntaxError as e:
        raise ConfigError("syntax error: %s" % e.msg, path, e.lineno) from None
    host = port = None
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = node.targets[0]
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(target, ast.Tuple) and isinstance(value, tuple) and len(value) == 2:
            names = [getattr(t, "id", "").lower() for t in target.elts]
            if names[0] in ("host", "ip", "addr", "address") and names[1] == "port":
                host, port = value
                continue
        if not isinstance(target, ast.Name):
            continue
        name = target.id.lower()
        if (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], int)):
            host, port = value
        elif name in ("host", "ip", "server_ip", "host_ip", "addr", "address") \
                and isinstance(value, str):
            host = value
        elif name in ("port", "server_port") and isinstance(value, int):
            port = value
    if host is None:
        raise ConfigError("no (host, port) tuple or host/ip assignment found", path)
    if port is not None:
        try:
            port = _port_number(port)
        except ConfigError as e:
            raise ConfigError(str(e), path, None, "port") from None
    return host, port, path


class _Setting(collections.namedtuple("_Setting", "value level name path")):
    """A resolved setting and where it came from: level is "flag", "alias",
    "environment", "config", "serverinfo" or "default"; name is the flag, the
    variable or the section; path the file, if any."""

    def source(self):
        """Where, in words: "--token", "XFER_TOKEN", "alias vm in FILE", "[DEFAULT] in FILE"."""
        if self.level == "alias":
            return "alias %s in %s" % (self.name, self.path)
        if self.level == "config":
            return "[%s] in %s" % (self.name, self.path)
        return self.name


class _Settings:
    """The one precedence every command's settings follow, first found wins
    (README "Environment variables and precedence"):

        flag > alias's own section > environment > config section
             > serverinfo.py > built-in default

    send, send-dir, ping and bench read the section [DEFAULT]; the alias
    (the section --to names) comes before the environment, which is the
    default for hosts the config does not know.  serve has no alias and
    reads [serve] (falling back to [DEFAULT] key by key, except where own).
    Only the host and its port have a serverinfo.py level.
    """

    def __init__(self, config, environ=None, section="DEFAULT", alias=None):
        self.config = config
        self.environ = os.environ if environ is None else environ
        self.section = section
        self.alias = alias

    def find(self, key, flag=None, flag_name=None, env=None, parse=None, own=False,
             serverinfo=None, default=None):
        """The _Setting that wins for key.

        flag: the command-line value (None, False or "" when not given).
        parse(text, what) checks text read from the environment or a file;
        its error names the variable, or the file, line and key.  own: read
        the config section itself, never its [DEFAULT] fallback.
        """
        if flag is not None and flag is not False and flag != "":
            return _Setting(flag, "flag", flag_name or "--" + key.replace("_", "-"), None)
        if self.alias is not None:
            entry = self.config.own(self.alias, key)
            if entry is not None:
                return _Setting(self._parsed(entry, key, parse), "alias", self.alias, entry[1])
        if env and self.environ.get(env):
            value = self.environ[env]
            return _Setting(parse(value, env) if parse else value, "environment", env, None)
        if own:
            entry = self.config.sections.get(self.section, {}).get(key)
        else:
            entry = self.config.get(self.section, key)
        if entry is not None:
            return _Setting(self._parsed(entry, key, parse), "config", self.section, entry[1])
        if serverinfo is not None:
            return _Setting(serverinfo, "serverinfo", "serverinfo.py",
                            self.config.serverinfo[2])
        return _Setting(default, "default", None, None)

    @staticmethod
    def _parsed(entry, key, parse):
        value, path, lineno = entry
        if parse is None:
            return value
        try:
            return parse(value, key)
        except (ConfigError, ValueError) as e:
            raise ConfigError(str(e), path, lineno, key) from None


def _whole_number(text, what):
    try:
        return int(text)
    except ValueError:
        raise ValueError("must be a whole number, not %r" % text) from None


def _at_least_one(text, what):
    """A count that must be 1 or more (as _positive_int on the command line)."""
    n = _whole_number(text, what)
    if n < 1:
        raise ValueError("must be at least 1, not %r" % text)
    return n


def _workers_value(text, what):
    """A number of workers: 1 to MAX_WORKERS (as _workers_arg on the command line)."""
    n = _at_least_one(text, what)
    if n > MAX_WORKERS:
        raise ValueError("must be at most %d, not %r" % (MAX_WORKERS, text))
    return n


def _overwrite_value(text, what):
    if text not in OVERWRITE_POLICIES:
        raise ValueError("must be one of %s, not %r" % (", ".join(OVERWRITE_POLICIES), text))
    return text


def _yes_no(text, what):
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("0", "no", "false", "off", ""):
        return False
    raise ValueError("must be yes or no, not %r" % text)


def _fingerprint_value(text, what):
    return _check_fingerprint(text)


def _size_value(text, what):
    return _parse_size(text)


def _resolve_target(config, to=None, token=None, environ=None, tls=False, fingerprint=None,
                    workers=None):
    """Resolve a client command's destination through _Settings: a _Target.

    to, token, tls, fingerprint and workers are the command-line flags.
    token_from says where the token came from, for a refusal.  to may be an
    alias, HOST or HOST:PORT (text or an _Address).
    """
    base = _Settings(config, environ)
    info = config.serverinfo
    to = base.find("to", flag=to, flag_name="--to", env="XFER_HOST", parse=_address_value,
                   serverinfo=info and info[0]).value
    if not to:
        raise ConfigError("no destination: pass --to HOST[:PORT], set XFER_HOST, or set "
                          "to = ALIAS in the config file")
    host, port, _ = to if isinstance(to, _Address) else _parse_address(to)
    alias = None
    if host in config.aliases():
        alias = host
        entry = config.get(alias, "host")
        host = _alias_host(*entry) if entry else alias
    settings = _Settings(config, environ, alias=alias)
    port = settings.find("port", flag=port, env="XFER_PORT", parse=_port_number,
                         serverinfo=info[1] if info and host == info[0] else None,
                         default=DEFAULT_PORT).value
    found = settings.find("token", flag=token, env="XFER_TOKEN")
    token, token_from = found.value, found.value and found.source()
    fallback = False
    if not token and _is_loopback(host):
        # Sending to this machine: use this machine's own server token.  Only
        # for loopback, so the token is never offered to another host.
        entry = config.sections.get("serve", {}).get("token")
        if entry:
            token, token_from = entry[0], "this machine's [serve] token in %s" % entry[1]
            fallback = True
    fingerprint = settings.find("fingerprint", flag=fingerprint,
                                parse=_fingerprint_value).value
    tls = settings.find("tls", flag=tls, parse=_yes_no).value or bool(fingerprint)
    workers = settings.find("workers", flag=workers, parse=_workers_value).value
    return _Target(host, port, token, tls, fingerprint, workers, fallback, token_from)


def _address_value(text, what):
    return _parse_address(text) if text.strip() else None


def _alias_host(value, path, lineno):
    """An alias section's host: a name or address, "[V6]" too, without a port."""
    try:
        host, port, _ = _parse_address(value)
    except ConfigError as e:
        raise ConfigError(str(e), path, lineno, "host") from None
    if port is not None:
        raise ConfigError("a host without a port: give it as port = %d" % port,
                          path, lineno, "host")
    return host


def _connection_options(args, target):
    """Sender keywords for a resolved target: the token, TLS, its pin and the
    known_hosts file, the same for send, send-dir, ping and bench."""
    return dict(token=target.token, tls=target.tls, fingerprint=target.fingerprint,
                known_hosts=_known_hosts_path(args) if target.tls else None,
                require_server_auth=not target.fallback)


_Target = collections.namedtuple("_Target",
                                 "host port token tls fingerprint workers fallback token_from")


def _is_loopback(host):
    if host.lower() in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


#------------------------------------------------------------
# command line
#------------------------------------------------------------

def _check_savable(path):
    """Refuse a settings file that _save_settings could not write (a
    directory, in a folder this user cannot write)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise ConfigError("not a file: the alias could not be saved there", path)
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)        # _save_settings makes the rest
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise ConfigError("not a folder this user can write in: the alias could not be "
                          "saved in %s" % path, folder)


def _save_settings(path, section, values=None, remove=False):
    """Set keys of one section (or remove the section) in an INI file.

    Written to a temporary file with mode 0600 and renamed over the old
    one, so a token is never readable by others and never half-written.
    configparser does not keep comments: a rewritten file loses them.
    """
    parser = configparser.ConfigParser(interpolation=None)
    if os.path.exists(path):
        _read_ini(Config(), path)           # refuses a broken file, naming file:line
        parser.read(path, encoding="utf-8-sig")
    if remove:
        if not parser.remove_section(section):
            raise ConfigError("no section [%s]" % section, path)
    else:
        if section != "DEFAULT" and not parser.has_section(section):
            parser.add_section(section)
        for key, value in (values or {}).items():
            if value is None:
                parser.remove_option(section, key)
            else:
                parser.set(section, key, str(value))
    folder = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(folder, ".%s.%s.tmp" % (os.path.basename(path), secrets.token_hex(4)))
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        # A read-only home (a service account's), or a file where a folder goes.
        raise ConfigError("cannot be written (%s: %s)" % (e.filename or folder,
                                                          e.strerror or e), path) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            parser.write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def _settings_path(args):
    """The file the CLI writes settings to: --config FILE or the per-user file."""
    return args.config or user_config_path()


def _known_hosts_path(args):
    return os.path.join(os.path.dirname(os.path.abspath(_settings_path(args))), "known_hosts")


def _ensure_certificate(folder):
    """Return (cert, key) of a self-signed certificate in folder, making one if needed."""
    cert = os.path.join(folder, "xfer-cert.pem")
    key = os.path.join(folder, "xfer-key.pem")
    if os.path.isfile(cert) and os.path.isfile(key):
        return cert, key
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("serve --tls needs a certificate and there is no openssl command "
                          "to make one: install openssl, or pass --tls-cert FILE --tls-key "
                          "FILE (any PEM certificate and key)")
    os.makedirs(folder, exist_ok=True)
    # openssl creates the key with the umask's mode: private from its first
    # byte, not only after a chmod.  serve calls this before it starts threads.
    umask = os.umask(0o077)
    try:
        proc = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "3650", "-subj", "/CN=xfer",
             "-keyout", key, "-out", cert],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    finally:
        os.umask(umask)
    if proc.returncode != 0 or not os.path.isfile(cert):
        raise ConfigError("openssl could not make a certificate: %s"
                          % (proc.stderr.strip().splitlines() or ["no output"])[-1])
    if os.name != "nt":
        os.chmod(key, 0o600)
    return cert, key


def _new_token():
    """A random 32-character token (192 bits) that never starts with "-",
    so it can follow --token on a command line."""
    while True:
        token = secrets.token_urlsafe(24)
        if token[0] != "-":
            return token


#: A documentation address (TEST-NET-1): connecting a UDP socket to it makes
#: the system pick the address of its default route, and sends nothing.
_ROUTE_PROBE = ("192.0.2.1", 9)
_SIOCGIFADDR = 0x8915     # Linux: an interface's IPv4 address
_SIOCGIFBRDADDR = 0x8919  # Linux: an interface's IPv4 broadcast address
_SIOCGIFNETMASK = 0x891b  # Linux: an interface's IPv4 netmask


def _ifreq_address(s, request, name):
    """The 4 address bytes an SIOCGIF* ioctl returns for interface name (OSError if none)."""
    ifreq = fcntl.ioctl(s.fileno(), request, struct.pack("256s", name.encode("utf-8")[:15]))
    return ifreq[20:24]     # struct ifreq's sin_addr


def _interface_ipv4(fields):
    """For each network interface with an IPv4 address, the tuple of the
    SIOCGIF* ioctls in fields, read from the kernel (Linux; [] elsewhere)."""
    if fcntl is None or not sys.platform.startswith("linux") \
            or not hasattr(socket, "if_nameindex"):
        return []
    found = []
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return []
    try:
        for _, name in socket.if_nameindex():
            try:
                found.append(tuple(_ifreq_address(s, request, name) for request in fields))
            except OSError:
                continue            # no IPv4 address on this interface
    except OSError:
        pass
    finally:
        s.close()
    return found


def _interface_addresses():
    """The IPv4 address of each network interface, read from the kernel (Linux; [] elsewhere)."""
    return [socket.inet_ntoa(address) for address, in _interface_ipv4((_SIOCGIFADDR,))]


def _interface_broadcasts():
    """The directed broadcast address of each IPv4 interface but loopback (Linux; [] elsewhere).

    Unlike 255.255.255.255, which leaves only by the default route (and not
    at all without one), each of these leaves by its own interface."""
    found = []
    for address, mask, broadcast in _interface_ipv4(
            (_SIOCGIFADDR, _SIOCGIFNETMASK, _SIOCGIFBRDADDR)):
        if address[0] == 127:
            continue
        if broadcast == bytes(4):           # none configured: the subnet's own
            broadcast = bytes(a | (~m & 0xff) for a, m in zip(address, mask))
        if broadcast == address:            # a /32: nobody else on that link
            continue
        text = socket.inet_ntoa(broadcast)
        if text not in found:
            found.append(text)
    return found


def _routed_address():
    """The address this machine sends from by default, or None; no packet is sent."""
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        s.connect(_ROUTE_PROBE)     # UDP: chooses a route, sends nothing
        return s.getsockname()[0]
    except OSError:
        return None
    finally:
        s.close()


def _local_addresses(interfaces=_interface_addresses, routed=_routed_address):
    """This machine's LAN (non-loopback) IPv4 addresses, for the pairing line.

    Read from the interfaces where the OS allows (Linux).  Elsewhere: on
    Windows the addresses its own host name resolves to (answered from the
    interfaces), everywhere the address of the default route.  Never a DNS,
    mDNS or any other query: a host name may resolve to 127.0.1.1 (Debian,
    Raspberry Pi OS) or not at all.  Link-local addresses come last.
    interfaces and routed (tests: another machine's) give the interfaces'
    addresses and the default route's address.
    """
    candidates = interfaces()
    if not [ip for ip in candidates if not ip.startswith("127.")]:
        if os.name == "nt":
            try:
                candidates += [info[4][0] for info in socket.getaddrinfo(
                    socket.gethostname(), None, socket.AF_INET, socket.SOCK_STREAM)]
            except OSError:
                pass
        candidates.append(routed())
    found = []
    for ip in candidates:
        if ip and not ip.startswith(("127.", "0.")) and ip not in found:
            found.append(ip)
    return sorted(found, key=lambda ip: ip.startswith("169.254."))


def _load_config(args, serverinfo=True):
    """load_config() for a command: its warnings go to stderr, one line each."""
    config = load_config(args.config, serverinfo=serverinfo)
    for line in config.warnings:
        sys.stderr.write("xfer: warning: %s\n" % line)
    return config


def _within(path, root):
    """Whether path is root or below it (both absolute and resolved)."""
    path, root = os.path.normcase(path), os.path.normcase(root)
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _serve_protected(config, settings, tls_cert, tls_key):
    """The files serve must never let a sender write: the config files it reads
    and writes, and the known_hosts, key and certificate files beside them."""
    paths = list(config.files) + [p for p in (tls_cert, tls_key) if p]
    for ini in (settings, user_config_path()):
        folder = os.path.dirname(os.path.abspath(ini))
        paths += [ini] + [os.path.join(folder, n)
                          for n in ("known_hosts", "xfer-cert.pem", "xfer-key.pem",
                                    "serverinfo.py")]
    unique = []
    for p in paths:
        p = os.path.abspath(p)
        if p not in unique:
            unique.append(p)
    return unique


def _check_serve_dir(directory, protected, allow_home):
    """Refuse a DIR through which senders could change this server or this account."""
    path = os.path.abspath(os.path.expanduser(directory))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("%s is a file, not a directory" % path)
    if allow_home:
        return
    real = os.path.realpath(path)
    home = os.path.expanduser("~")
    if home != "~" and _within(os.path.realpath(home), real):
        raise ConfigError(
            "%s is %s: a sender could replace any file there (~/.ssh/authorized_keys, "
            "xfer's own config); receive into a directory of its own such as ~/incoming, or "
            "pass --allow-home" % (path, "the home directory" if _within(real, os.path.realpath(
                home)) else "a parent of the home directory"))
    for p in protected:
        if _within(os.path.realpath(p), real):
            raise ConfigError("%s holds this server's own %s, which a sender could then "
                              "replace; choose another --dir, or pass --allow-home (names "
                              "that reach such files are then refused)" % (path, p))


_ServeSettings = collections.namedtuple("_ServeSettings", (
    "dir host port token token_from no_auth tls tls_cert tls_key allow_home allow_get "
    "max_connections max_size portable overwrite settings protected no_discovery web"))


def _serve_settings(args, config, environ=None):
    """serve's settings through _Settings: flag > environment > [serve] (then
    [DEFAULT]) > default; no alias and no serverinfo.py (README "serve")."""
    settings = _Settings(config, environ, section="serve")
    find = settings.find
    token = find("token", flag=args.token, env="XFER_TOKEN")
    token_from = None
    if token.value:
        token_from = "kept in %s" % token.path if token.level == "config" \
            else "from %s" % token.name
    tls_cert = find("tls_cert", flag=args.tls_cert).value
    key = find("tls_key", flag=args.tls_key)
    tls_key = key.value
    if tls_key and not tls_cert:
        # Else the key is dropped unsaid: serve runs plain, or --tls makes its own.
        raise ConfigError("%s needs the certificate it goes with: give --tls-cert FILE too, "
                          "or --tls alone to make both" % (
                              "--tls-key" if key.level == "flag" else
                              "tls_key (%s)" % key.source()))
    path = _settings_path(args)
    return _ServeSettings(
        dir=find("dir", flag=args.dir, env="XFER_DIR", default=".").value,
        # The listen address comes from [serve] only: a [DEFAULT] host is
        # where senders send to, not an address of this machine.
        host=find("host", flag=args.host, own=True, default="0.0.0.0").value,
        port=find("port", flag=args.port, env="XFER_PORT", parse=_port_number,
                  default=DEFAULT_PORT).value,
        token=token.value, token_from=token_from,
        no_auth=find("no_auth", flag=args.no_auth, parse=_yes_no).value,
        tls=find("tls", flag=args.tls, parse=_yes_no).value,
        tls_cert=tls_cert, tls_key=tls_key,
        allow_home=find("allow_home", flag=args.allow_home, parse=_yes_no).value,
        allow_get=bool(find("allow_get", flag=args.allow_get, parse=_yes_no).value),
        max_connections=find("max_connections", flag=args.max_connections,
                             parse=_at_least_one).value or DEFAULT_MAX_CONNECTIONS,
        max_size=find("max_size", flag=args.max_size, parse=_size_value).value,
        portable=True if find("portable_names", flag=args.portable_names,
                              parse=_yes_no).value else None,
        overwrite=find("overwrite", flag=args.overwrite,
                       parse=_overwrite_value).value or "replace",
        settings=path, protected=_serve_protected(config, path, tls_cert, tls_key),
        no_discovery=find("no_discovery", flag=args.no_discovery, parse=_yes_no).value,
        web=not args.no_web and find("web", parse=_yes_no, default=True).value)


def _serve_token(opts):
    """The token serve requires and the banner's note on it; a new one is saved."""
    if opts.no_auth:
        return None, None
    if opts.token:
        return opts.token, opts.token_from
    token = _new_token()
    _save_settings(opts.settings, "serve", {"token": token})
    return token, "new, kept in %s" % opts.settings


class _ServeOutput:
    """What serve prints: the prose log on stderr, or JSON events on stdout
    (--json), both through one _Lines, so a burst costs one write."""

    def __init__(self, quiet, as_json):
        self.quiet, self.as_json = quiet, as_json
        self.lines = _Lines(sys.stdout if as_json else sys.stderr)
        self.emit = _json_writer(self.lines)
        self.hooks = None
        self._stamp = (0, "")     # the time of day, formatted once a second

    def log(self, line):
        """Refusals and errors: written even with -q."""
        if self.as_json:
            self.emit("log", message=line)
            return
        self.lines.write("%s %s\n" % (self._time_of_day(), line))

    def _time_of_day(self):
        """What each prose line starts with: now, formatted once a second."""
        now = int(time.time())
        if now != self._stamp[0]:
            self._stamp = now, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
        return self._stamp[1]

    def note(self, line):
        """Everything else (received files, stopping, stopped): not with -q."""
        if self.as_json or not self.quiet:
            self.log(line)

    def files_listener(self):
        """The Receiver's on_files: None when nothing is said or run per file
        (-q, no --json, no --on-receive), so files are only counted."""
        if self.quiet and not self.as_json and self.hooks is None:
            return None
        return self.on_files

    def on_files(self, infos):
        """The files one commit published, in order.  Their lines are made
        with one reading of the clock and written in one call: per line, a
        clock read and a locked write would cost more than making the line."""
        if self.as_json:
            for info in infos:
                self.emit("file_received", peer=info.peer, path=info.path,
                          relpath=info.relpath, bytes=info.size,
                          seconds=round(info.seconds, 6), digest=info.digest)
        elif not self.quiet:     # notices, the lines log() writes, in one format
            stamp = self._time_of_day()
            self.lines.write("".join([
                "%s %s: received %s (%s, %s/s)\n" % (
                    stamp, info.peer, _display(info.relpath), _human(info.size),
                    _human(info.size / info.seconds if info.seconds > 0 else 0.0))
                for info in infos]))
        if self.hooks is not None:   # a hook's output follows the line saying its file arrived
            for info in infos:
                self.hooks.submit(info)

    def on_session(self, info):
        if self.as_json:
            self.emit("session_ended", peer=info.peer, files=info.files, bytes=info.bytes,
                      skipped=info.skipped, failed=info.failed, dirs=info.dirs,
                      clean=info.clean, seconds=round(info.seconds, 3))

    def listening(self, receiver, token, token_from):
        bound_host, bound_port = receiver.address[:2]
        # A code nobody sees (-q) would only be a target.
        pairing = _ServePairing(receiver, self.emit if self.as_json else None) \
            if token and (self.as_json or not self.quiet) else None
        if self.as_json:
            self.emit("listening", address=_host_port_text(bound_host, bound_port),
                      dir=receiver.dir, auth=bool(token), fingerprint=receiver.fingerprint,
                      web=_page_url(receiver, _reachable_at(bound_host)[0], bound_port))
        else:
            sys.stdout.write("listening on %s\n" % _host_port_text(bound_host, bound_port))
            sys.stdout.flush()
        if pairing is not None:
            pairing.start()
        if not self.as_json and not self.quiet:
            _print_banner(receiver, token, token_from if token else None, bound_host,
                          bound_port, pairing and pairing.code)

    def stopped(self, receiver):
        if self.as_json:
            self.emit("stopped", files=receiver.files_received,
                      bytes=receiver.bytes_received, failed=receiver.files_failed)
        else:
            self.note("stopped: %d file%s received (%s), %d failed" % (
                receiver.files_received, "" if receiver.files_received == 1 else "s",
                _human(receiver.bytes_received), receiver.files_failed))

    def close(self, stop=None):
        if self.hooks is not None:
            self.hooks.close(stop)
        self.lines.close()


class _Once:
    """serve --once: the first sender is done when none of its connections is
    left open and none has come back for a moment (a sender opens several,
    and reconnects after a broken one).  saw() runs on each connection's
    thread, so the tally is read and written under a lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen, self.clean, self.failed = False, True, 0
        self.idle_since = None

    def saw(self, info):
        if info.files or info.skipped or info.failed or info.dirs or not info.clean:
            with self.lock:
                self.seen, self.clean = True, info.clean
                self.failed += info.failed

    def finished(self, receiver):
        """None while the sender may still be at work, else the exit status."""
        with self.lock:
            seen, clean, failed = self.seen, self.clean, self.failed
        if not seen or receiver.connections:
            self.idle_since = None
            return None
        now = time.monotonic()
        self.idle_since = self.idle_since or now
        if now - self.idle_since < (ONCE_LINGER if clean else ONCE_RETRY_LINGER):
            return None
        return EXIT_FAILED if failed or not clean else EXIT_OK


class _Signals:
    """How every command hears SIGINT, SIGTERM and (Windows) SIGBREAK.

    While installed (a `with` block, in the main thread; elsewhere nothing
    is), each signal named only records itself in `received` and cuts
    wait() short.  The command's main thread looks at `received` between
    waits: a KeyboardInterrupt raised wherever that thread happens to be
    can land between a lock's acquire and the block that releases it
    (inside Condition.wait, for one), and stopping needs the same lock.

    A signal the process ignores stays ignored (a shell starts a background
    job with SIGINT ignored), unless even_ignored: serve stops on
    `kill -INT` however it was started.

    The system may deliver a signal to any thread.  Python runs the handler
    in the main thread, but only once that thread is awake: a time.sleep()
    there could sleep on through a SIGTERM that another thread received.
    With a wakeup fd, every signal also writes a byte to the socket that
    wait() waits on.
    """

    STOP = ("SIGINT", "SIGTERM", "SIGBREAK")

    def __init__(self, names=STOP, even_ignored=False):
        self.names = names
        self.even_ignored = even_ignored
        self.received = []          # signal numbers, in the order they came
        self._previous = {}
        self._wakeup = None         # (reading socket, writing socket, previous fd)

    def _on_signal(self, signum, frame):
        self.received.append(signum)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.names:
            number = getattr(signal, name, None)
            if number is not None and (self.even_ignored
                                       or signal.getsignal(number) is not signal.SIG_IGN):
                self._previous[number] = signal.signal(number, self._on_signal)
        r, w = socket.socketpair()
        w.setblocking(False)
        self._wakeup = (r, w, signal.set_wakeup_fd(w.fileno()))
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        if self._wakeup is not None:
            r, w, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            r.close()
            w.close()

    def exit_status(self):
        """EXIT_INTERRUPTED if Ctrl-C (SIGINT) came first, else EXIT_OK (SIGTERM, Ctrl-Break)."""
        return EXIT_INTERRUPTED if self.received[0] == signal.SIGINT else EXIT_OK

    def wait(self, seconds):
        """Sleep up to seconds, less if a signal arrives (its handler runs next)."""
        if self._wakeup is None:
            time.sleep(seconds)
            return
        r = self._wakeup[0]
        r.settimeout(seconds)
        try:
            r.recv(512)
        except OSError:          # socket.timeout: no signal
            pass


def _cmd_serve(args):
    """serve: resolve the settings, check DIR, build the Receiver, print the
    banner, run until a signal (or --once's end), print the summary."""
    # Nothing from the working directory (no command reads any): with the
    # default --dir . files that senders store land there (README "Security").
    opts = _serve_settings(args, _load_config(args, serverinfo=False))
    # Before anything is written: a new token, a certificate.
    _check_serve_dir(opts.dir, opts.protected, opts.allow_home)
    token, token_from = _serve_token(opts)
    tls_cert, tls_key = opts.tls_cert, opts.tls_key
    if not tls_cert and opts.tls:
        tls_cert, tls_key = _ensure_certificate(os.path.dirname(os.path.abspath(opts.settings)))
    out = _ServeOutput(args.quiet, args.json)
    if args.on_receive:
        out.hooks = _Hooks(args.on_receive, out.log, args.hook_timeout, out.note,
                           before=out.lines.write_pending)
    once = _Once()

    def on_session(info):
        out.on_session(info)
        once.saw(info)

    receiver = Receiver(opts.dir, host=opts.host, port=opts.port, token=token,
                        on_files=out.files_listener(), on_session=on_session,
                        quiet=args.quiet and not args.json, log=out.log,
                        max_connections=opts.max_connections, max_size=opts.max_size,
                        idle_timeout=args.idle_timeout,
                        handshake_timeout=args.handshake_timeout,
                        max_path_bytes=args.max_path, max_depth=args.max_depth,
                        portable_names=opts.portable, tls_cert=tls_cert, tls_key=tls_key,
                        overwrite=opts.overwrite, partial_max_age=args.partial_max_age * 86400,
                        protect=opts.protected, allow_get=opts.allow_get,
                        discovery=not opts.no_discovery, web=opts.web,
                        # A browser keeps its connection: --once closes it
                        # soon after the last request, so that its upload ends.
                        http_keep_alive=ONCE_LINGER if args.once else None)
    status = None
    # Installed before the readiness line, so a supervisor may send SIGTERM
    # as soon as it has read it.
    with _Signals(even_ignored=True) as stop:
        try:
            receiver.start()
            out.listening(receiver, token, token_from)
            while not stop.received and status is None:
                stop.wait(0.1 if args.once else 3600)   # a signal cuts this short
                if args.once:
                    status = once.finished(receiver)
            if stop.received:
                status = EXIT_INTERRUPTED if args.once else EXIT_OK
                if receiver.connections and args.grace > 0:
                    out.note("stopping: letting %d connection%s finish (at most %s)"
                             % (receiver.connections, "" if receiver.connections == 1 else "s",
                                _duration(args.grace)))
        finally:
            receiver.stop(grace=args.grace)
            out.close(stop)
    out.stopped(receiver)
    return status


def _json_writer(stream):
    """A function that writes one JSON event per line (README "JSON events")."""
    lock = threading.Lock()
    gone = []

    def emit(name, **fields):
        if gone:
            return
        event = collections.OrderedDict(event=name, time=round(time.time(), 3))
        event.update(fields)
        line = json.dumps(event) + "\n"
        with lock:      # callbacks of several connections may emit at once
            try:
                stream.write(line)
                stream.flush()
            except BrokenPipeError:
                # The reader went away (--json | head): the work goes on
                # without its events, and nothing is written there again.
                gone.append(True)
                _drop_stream(stream)
    return emit


def _drop_stream(stream):
    """Point a stream whose reader has gone at os.devnull, so that the
    interpreter's last flush at exit does not fail on it too."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


class _Lines:
    """A text stream that writes its lines in batches, from a thread of its
    own: a line waits at most delay seconds.  Threads may write at once."""

    def __init__(self, stream, delay=LOG_DELAY):
        self.stream = stream
        self.delay = delay
        self.cv = threading.Condition()
        self.pending = []
        self.closed = False
        self.out_lock = threading.Lock()      # batches leave in order
        self.thread = threading.Thread(target=self._run, name="xfer-log", daemon=True)
        self.thread.start()

    def write(self, text):
        with self.cv:
            self.pending.append(text)
            if len(self.pending) == 1:
                self.cv.notify()
            if not self.closed:
                return
        self._write()

    def flush(self):
        """Nothing: the thread writes within delay seconds (close() at once)."""

    def write_pending(self):
        """Write the lines waiting now, from the calling thread."""
        self._write()

    def _run(self):
        while True:
            with self.cv:
                while not self.pending and not self.closed:
                    self.cv.wait()
                if self.closed:
                    return
                self.cv.wait(self.delay)     # let the burst gather
            self._write()

    def _write(self):
        with self.out_lock:
            with self.cv:
                lines, self.pending = self.pending, []
            if lines:
                try:
                    self.stream.write("".join(lines))
                    self.stream.flush()
                except (OSError, ValueError):
                    pass          # the reader went away; serving goes on

    def close(self):
        """Write what is pending now; later lines are written at once."""
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join()
        self._write()


class _Hooks:
    """serve --on-receive: run a command for each verified file, off the receiving threads.

    The command gets the final path as its last argument (an argument
    list, no shell) and XFER_PEER, XFER_RELPATH, XFER_SIZE, XFER_SHA256 in
    its environment; its output goes to stderr.  HOOK_WORKERS run at once
    and HOOK_QUEUE wait; a file beyond that gets no hook.  A hook that
    fails, or runs past timeout and is killed, is logged; receiving goes on.
    """

    def __init__(self, command, log, timeout=DEFAULT_HOOK_TIMEOUT, note=None, before=None):
        # On Windows a command line is one string that the program parses
        # itself; it is still run directly, not through cmd.exe.
        try:
            self.argv = shlex.split(command) if os.name != "nt" else [command]
        except ValueError as e:
            raise ConfigError("--on-receive: %s in %r" % (e, command)) from None
        if not command.strip():
            raise ConfigError("--on-receive: empty command")
        self.log = log                  # failures
        self.note = note or log         # the rest
        self.timeout = timeout
        self.before = before        # called before each hook starts
        self.queue = queue.Queue(HOOK_QUEUE)
        self.threads = []
        self.running = set()        # the hooks' processes, for close() to kill
        self.lock = threading.Lock()
        self.given_up = False

    def submit(self, info):
        if not self.threads:
            self.threads = [threading.Thread(target=self._work, name="xfer-hook", daemon=True)
                            for _ in range(HOOK_WORKERS)]
            for t in self.threads:
                t.start()
        try:
            self.queue.put_nowait(info)
        except queue.Full:
            self.log("hook not run for %s: %d hooks already waiting"
                     % (_display(info.relpath), HOOK_QUEUE))

    def _work(self):
        while True:
            info = self.queue.get()
            if info is _STOP:
                return
            try:
                self._run(info)
            except Exception as e:     # a bug: keep the other hooks running
                self.log("hook for %s: internal error: %r" % (_display(info.relpath), e))

    def _run(self, info):
        env = dict(os.environ, XFER_PEER=info.peer, XFER_RELPATH=info.relpath,
                   XFER_SIZE=str(info.size), XFER_SHA256=info.digest)
        if os.name == "nt":
            cmd = self.argv[0] + " " + subprocess.list2cmdline([info.path])
        else:
            cmd = self.argv + [info.path]
        name = _display(info.relpath)
        if self.before is not None:
            self.before()
        try:
            out = sys.stderr.fileno()
        except (AttributeError, ValueError, OSError):
            out = None      # stderr is not a file (embedded): inherit stdout
        with self.lock:
            if self.given_up:
                return
            try:
                proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out)
            except (OSError, ValueError) as e:
                self.log("hook for %s could not start: %s"
                         % (name, getattr(e, "strerror", e) or e))
                return
            self.running.add(proc)
        try:
            status = proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            if not self.given_up:
                self.log("hook for %s killed: still running after %gs" % (name, self.timeout))
            return
        finally:
            with self.lock:
                self.running.discard(proc)
        if status and not self.given_up:
            self.log("hook for %s failed with status %d" % (name, status))

    def close(self, stop=None):
        """Let waiting hooks run (each within its timeout), then stop.

        stop: serve's _Signals; one more signal while this waits gives up
        the hooks still waiting and kills the ones running."""
        given = len(stop.received) if stop is not None else 0
        if self.queue.qsize():
            self.note("running %d waiting hook%s before exiting"
                     % (self.queue.qsize(), "" if self.queue.qsize() == 1 else "s"))
        stops = len(self.threads)       # to queue behind the waiting hooks (a full queue)
        while stops or any(t.is_alive() for t in self.threads):
            if stop is not None and len(stop.received) > given:
                self._give_up()
                return
            if stops:
                try:
                    self.queue.put(_STOP, timeout=0.1)
                    stops -= 1
                except queue.Full:
                    pass
            else:
                for t in self.threads:
                    t.join(0.1)

    def _give_up(self):
        with self.lock:
            self.given_up = True
            left = 0
            while True:
                try:
                    left += self.queue.get_nowait() is not _STOP
                except queue.Empty:
                    break
            for proc in self.running:
                proc.kill()
            self.log("stopped again: %d waiting hook%s not run, %d running killed"
                     % (left, "" if left == 1 else "s", len(self.running)))
        for t in self.threads:
            self.queue.put(_STOP)


def _print_banner(receiver, token, token_from, bound_host, bound_port, code=None,
                  local=_local_addresses):
    """The startup banner: where files go, the pairing code and the command
    that pairs a sender, and the line that pairs one by hand.  local (tests:
    another machine's) gives this machine's LAN addresses."""
    out = ["xfer %s receiving into %s" % (__version__, receiver.dir)]
    addresses = _reachable_at(bound_host, local)
    where = _host_port_text(addresses[0], bound_port)
    if token:
        out.append("token required (%s)" % token_from)
    else:
        out.append("WARNING: --no-auth: anyone who can reach port %d can write into %s"
                   % (bound_port, receiver.dir))
    if receiver.fingerprint:
        out.append("TLS certificate fingerprint %s" % receiver.fingerprint)
    name = _server_name(getattr(receiver, "name", None))
    if code:
        # Discovery finds a server on the standard port; elsewhere the
        # sender needs the address too.
        found = getattr(receiver, "_discovery", None) is not None and bound_port == DEFAULT_PORT
        out.append("pairing code: %s (%s)" % (code, _CODE_TERMS))
        out.append("to pair a sending machine, run this there:")
        out.append("  python3 xfer.py pair %s%s" % (code, "" if found else " " + where))
        out.append("or, to pair it by hand or from a script:")
    elif token or receiver.fingerprint:
        out.append("to pair a sending machine, run this there:")
    if token or receiver.fingerprint:
        line = "  python3 xfer.py config add %s %s" % (name, where)
        if token:
            line += (" --token=" if token.startswith("-") else " --token ") + token
        if receiver.fingerprint:
            line += " --fingerprint " + receiver.fingerprint
        out.append(line)
        out.append("then send with:  python3 xfer.py send FILE... %s:" % name)
    page = _page_url(receiver, addresses[0], bound_port)
    if page:
        out.append("web page: " + page)
    if len(addresses) > 1:
        out.append("addresses: %s" % ", ".join(addresses))
    sys.stdout.write("".join(line + "\n" for line in out))
    sys.stdout.flush()


def _reachable_at(bound_host, local=_local_addresses):
    """The addresses other machines reach a server bound to bound_host at,
    the most likely first: its LAN addresses when it listens on all of them."""
    if bound_host in ("0.0.0.0", "::", ""):
        return local() or ["127.0.0.1"]    # loopback only if that is all
    return [bound_host]


def _page_url(receiver, host, port):
    """The web page's address at host (README "Browser"), or None
    without one (--no-web)."""
    if not getattr(receiver, "web", False):
        return None
    return "%s://%s/" % ("https" if receiver.fingerprint else "http",
                         _host_port_text(host, port))


_CODE_TERMS = "valid %d minutes, for one pairing; press Enter here for a new one" % (
    PAIRING_LIFETIME // 60)


class _ServePairing:
    """serve's pairing code: opened at start, a new one when Enter is pressed.

    Standard input is read only where that cannot stop serve: not from a
    terminal whose foreground is another job (`serve &` would be stopped
    by SIGTTIN); a terminal that later puts serve in the background makes
    the read fail (SIGTTIN ignored) and the key does nothing more.
    """

    def __init__(self, receiver, emit=None):
        self.receiver = receiver
        self.emit = emit
        self.code = receiver.open_pairing()

    def start(self):
        if self.emit is not None:
            self.emit("pairing_code", code=self.code, seconds=PAIRING_LIFETIME)
        stdin = sys.stdin
        try:
            if stdin is None or stdin.closed:
                return
            if stdin.isatty():
                if hasattr(os, "tcgetpgrp") and os.tcgetpgrp(stdin.fileno()) != os.getpgrp():
                    return
                if hasattr(signal, "SIGTTIN"):
                    signal.signal(signal.SIGTTIN, signal.SIG_IGN)
        except (OSError, ValueError):
            return
        threading.Thread(target=self._read, args=(stdin,), name="xfer-pairing-key",
                         daemon=True).start()

    def _read(self, stdin):
        try:
            while stdin.readline():
                self.renew()
        except (OSError, ValueError):
            pass

    def renew(self):
        self.code = code = self.receiver.open_pairing()
        if self.emit is not None:
            self.emit("pairing_code", code=code, seconds=PAIRING_LIFETIME)
        else:
            sys.stdout.write("pairing code: %s (%s)\n  python3 xfer.py pair %s\n"
                             % (code, _CODE_TERMS, code))
            sys.stdout.flush()


def _terminal_width(stream):
    """Columns of the terminal stream writes to: $COLUMNS, the terminal's, or 80."""
    try:
        return max(20, int(os.environ["COLUMNS"]))
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _enable_ansi(stream):
    """True if stream is a terminal that understands cursor movement.

    Windows 10 consoles do once virtual terminal processing is switched on.
    """
    try:
        if not stream.isatty() or os.environ.get("TERM") == "dumb":
            return False
    except (AttributeError, ValueError):
        return False
    if os.name != "nt":
        return True
    try:
        import ctypes
        import msvcrt
        kernel32 = ctypes.windll.kernel32
        handle = msvcrt.get_osfhandle(stream.fileno())
        mode = ctypes.c_uint32()
        if not kernel32.GetConsoleMode(handle, ctypes.byref(mode)):
            return False
        return bool(kernel32.SetConsoleMode(handle, mode.value | 0x0004))
    except Exception:
        return False


def _cell(ch):
    """Terminal cells of one character: wide characters take two, combining ones none."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _cells(text):
    return sum(map(_cell, text))


def _fit(text, columns):
    """text cut to at most columns terminal cells."""
    used = 0
    for i, ch in enumerate(text):
        if used + _cell(ch) > columns:
            return text[:i]
        used += _cell(ch)
    return text


def _fit_left(text, columns):
    """text cut from the left to at most columns cells, "..." standing for the cut part."""
    if _cells(text) <= columns:
        return text
    used = 3
    for i in range(len(text) - 1, -1, -1):
        if used + _cell(text[i]) > columns:
            return "..." + text[i + 1:] if columns >= 3 else ""
        used += _cell(text[i])
    return text


def _clock(seconds):
    seconds = int(seconds)
    if seconds >= 3600:
        return "%d:%02d:%02d" % (seconds // 3600, seconds // 60 % 60, seconds % 60)
    return "%d:%02d" % (seconds // 60, seconds % 60)


def _flight_name(job):
    """How the live line names a file in flight: below its tree, else its base name."""
    parent = getattr(job, "parent", None)
    if parent is not None and job.name.startswith(parent.name + "/"):
        name = job.name[len(parent.name) + 1:]
    else:
        name = job.name.rsplit("/", 1)[-1]
    if getattr(job, "state", None) == "verifying":
        # hashing the part the receiver kept, before resuming after it
        return "verifying " + _display(name)
    return _display(name)


class _Track:
    """One destination of a send (or the server of a get), as the report
    sees it (main thread only)."""

    def __init__(self, label, to, subdir="", direction="send"):
        self.label = label          # prefix of its lines; "" with one destination
        self.to = to                # "host:port", for JSON events
        self.subdir = subdir        # DIR of HOST:DIR
        self.direction = direction  # "send", or "get": files come from the server
        self.sender = None
        self.token_from = None      # where its token came from, named if it is refused
        self.jobs = []              # top-level jobs
        self.ended = 0              # files ended, in any state
        self.failed_inputs = 0      # operands that were never queued
        self.sending = collections.OrderedDict()    # files in flight
        self.samples = collections.deque()          # (time, bytes) for the rate
        self.started = time.monotonic()
        self.last_event = 0.0
        self.first_error = None     # text of the first file that failed
        self.said = set()           # error lines printed, so each is printed once

    @property
    def files_total(self):
        # A get's count grows as the server announces its files.
        return sum(j.files_total if j.kind in ("dir", "get") else 1 for j in self.jobs)

    @property
    def failed(self):
        return (self.sender.files_failed + self.failed_inputs
                + sum(1 for j in self.jobs if _own_error(j)))

    @property
    def finished(self):
        return all(j.done for j in self.jobs)

    @property
    def all_failed(self):
        """True once every file has ended and none arrived (the live line says so)."""
        s = self.sender
        return (self.finished and self.failed > 0
                and not s.files_done and not s.files_skipped)

    def interrupted(self):
        """Files not finished: sent + skipped + failed + interrupted = all files."""
        s = self.sender
        return max(0, self.files_total + self.failed_inputs - s.files_done - s.files_skipped
                   - self.failed)

    def rate(self, now):
        """Bytes per second over the last few seconds."""
        done = sum(j.bytes_done for j in self.jobs)
        self.samples.append((now, done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= 3.0:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        return (done - b0) / (now - t0) if now - t0 > 0.2 else None

    def summary(self, interrupted=False):
        """The one line a send ends with (README "send and send-dir")."""
        s = self.sender
        get = self.direction == "get"
        if not (interrupted or s.files_done or self.failed) and s.files_skipped:
            return self.label + "nothing to %s: %d file%s already there" % (
                "get" if get else "send", s.files_skipped, "" if s.files_skipped == 1 else "s")
        seconds = time.monotonic() - self.started
        rate = s.bytes_sent / seconds if seconds > 0 else 0.0
        line = "%s %d file%s, %s in %.2f s (%s/s)" % (
            "got" if get else "sent", s.files_done, "" if s.files_done == 1 else "s", _human(s.bytes_sent), seconds,
            _human(rate))
        if s.bytes_resumed:
            line += ", %s resumed" % _human(s.bytes_resumed)
        if s.files_skipped:
            line += ", %d skipped" % s.files_skipped
        if self.failed:
            line += ", %d FAILED" % self.failed
        if interrupted:
            if self.interrupted():
                line += ", %d interrupted" % self.interrupted()
            if s.bytes_kept:
                line += ", %s kept for resume" % _human(s.bytes_kept)
        return self.label + line


def _own_error(job):
    """A get's (or list's) own failure, not one of its files': refused as a
    whole, or its connection failed.  None for any other job."""
    if job.kind not in _REQUEST_KINDS or job.state != "failed":
        return None
    # A get whose answer ended (DONE) ended as a tree does, its error its
    # files'; one still waiting for its answer was ended by its own error.
    if job.kind == "get" and not job._pending:
        return None
    return job.error


class _Report:
    """What send and send-dir print, fed by Sender callbacks on the main thread.

    Modes: "live" redraws one status line per destination on a terminal,
    at most ten times a second; "plain" never redraws (pipes, cron,
    journald); "json" writes one JSON object per event to out (README
    "JSON events"); "quiet" prints errors only.  verbose adds a line per
    finished file in "live" and "plain".
    """

    REDRAW = 0.1            # seconds between redraws of the live display
    JSON_PROGRESS = 0.5     # seconds between "progress" events per destination

    def __init__(self, mode, verbose=False, err=None, out=None, width=None):
        self.mode = mode
        self.verbose = verbose and mode in ("live", "plain")
        self.err = err or sys.stderr
        self.out = out or sys.stdout
        self.emit = _json_writer(self.out) if mode == "json" else None
        self.width = width or (lambda: _terminal_width(self.err))
        self.tracks = []
        self.drawn = 0              # lines of the live display on screen
        self.last_draw = 0.0

    def track(self, label, to, subdir="", direction="send"):
        """A new destination (or a get's server); returns it with the Sender
        callbacks to use."""
        t = _Track(label, to, subdir, direction)
        self.tracks.append(t)
        callbacks = dict(on_error=lambda job: self._ended(t, job))
        # Only what the mode shows: each callback costs the send some CPU
        # per file.
        if self.mode in ("live", "json"):
            callbacks["on_start"] = lambda job: self._started(t, job)
        if self.mode in ("live", "json") or self.verbose:
            callbacks["on_done"] = lambda job: self._ended(t, job)
        return t, callbacks

    # -- events

    def _started(self, t, job):
        t.sending[id(job)] = job
        self._event("file_started", t, path=job.name, size=job.size)

    def _ended(self, t, job):
        t.sending.pop(id(job), None)
        if job.kind in ("dir", "get") and not _own_error(job):
            return          # its files were reported one by one
        if job.kind == "file":
            t.ended += 1
        if job.state == "cancelled":
            return          # Ctrl-C or cancel(): counted as interrupted, not failed
        if job.state in ("done", "skipped"):
            if job.kind != "file":
                return
            if self.mode == "json":
                seconds = (job.finished - job.started) if job.started else 0.0
                self._event("file_done", t, path=job.name, bytes=job.size,
                            seconds=round(seconds, 6), digest=job.digest,
                            skipped=job.state == "skipped", resumed=job.resumed,
                            note=job.note or None)
            if self.verbose:
                notes = [job.note] if job.note else []
                if job.resumed:
                    notes.append("resumed after %s" % _human(job.resumed))
                self.say("%s%s %s (%s%s)" % (
                    t.label, "skipped" if job.state == "skipped" else (
                        "got" if t.direction == "get" else "sent"),
                    _display(job.name), _human(job.size),
                    "".join(", " + _display(n) for n in notes)))
            return
        if t.first_error is None:
            t.first_error = str(job.error)
        self._event("file_failed", t, path=job.name, reason=str(job.error),
                    exit=getattr(job.error, "exit_code", EXIT_FAILED))
        text = str(job.error)
        if t.label and getattr(job.error, "host", None):
            text = job.error.reason      # the label names the receiver already
        self.error(t, text)

    def error(self, t, text):
        """Print t's error line, unless the same line was printed already: a
        connection that fails fails every file in flight on it, and each
        worker's connection fails on its own."""
        if self.mode != "json" and text not in t.said:
            t.said.add(text)
            self.say("xfer: error: %s%s" % (t.label, _display(text, limit=2000)))

    def input_error(self, path, why):
        """An operand that cannot be sent: it counts as failed for every destination."""
        for t in self.tracks:
            t.failed_inputs += 1
            if t.first_error is None:
                t.first_error = "%s: %s" % (path, why)
        if self.mode == "json":
            for t in self.tracks:
                name = "/".join(p for p in (t.subdir, os.path.basename(os.path.abspath(path)))
                                if p)
                self._event("file_failed", t, path=name, reason="%s: %s" % (path, why),
                            exit=EXIT_FAILED)
        else:
            self.say("xfer: error: %s: %s" % (_display(path), why))

    def _event(self, name, t, **fields):
        # A get's events name the server it copies from: "from", not "to".
        if self.mode == "json":
            self.emit(name, **{"from" if t.direction == "get" else "to": t.to,
                               "direction": t.direction}, **fields)

    def say(self, line, stream=None):
        """Print a line that stays, above the live display."""
        self._clear()
        stream = stream or self.err
        stream.write(line + "\n")
        stream.flush()
        self.last_draw = 0.0

    # -- the display

    def tick(self):
        """Redraw or report progress if it is time; cheap to call often."""
        now = time.monotonic()
        if self.mode == "live" and now - self.last_draw >= self.REDRAW:
            self.last_draw = now
            self._draw(now)
        elif self.mode == "json":
            for t in self.tracks:
                if now - t.last_event >= self.JSON_PROGRESS and not t.finished:
                    t.last_event = now
                    rate = t.rate(now)
                    self._event("progress", t, bytes_done=sum(j.bytes_done for j in t.jobs),
                                bytes_total=sum(j.size for j in t.jobs),
                                files_done=t.ended, files_total=t.files_total,
                                rate=None if rate is None else round(rate))

    def status_line(self, t, now, width):
        """One destination's live line, cut to width."""
        if t.finished and t.sender.error is not None:
            text = "%sFAILED: %s" % (t.label, _display(str(t.sender.error)))
        elif t.all_failed:
            # It stays like this while the other destinations go on.
            text = "%sFAILED: %s" % (t.label, _display(t.first_error or "nothing arrived"))
        elif not t.finished and not t.sender.connected:
            text = "%sconnecting to %s..." % (t.label, t.to)
        else:
            done = sum(j.bytes_done for j in t.jobs)
            total = sum(j.size for j in t.jobs)
            rate = t.rate(now)
            eta = ""
            if rate and total > done:
                eta = "  ETA %s" % _clock((total - done) / rate)
            text = "%s%3d%%  %s / %s  %s/s%s  %d/%d files" % (
                t.label, 100 * done // total if total else (100 if t.finished else 0),
                _human(done), _human(total), _human(rate) if rate is not None else "--",
                eta, t.ended, t.files_total)
            names = [_flight_name(j) for j in itertools.islice(t.sending.values(), 4)]
            room = width - 1 - _cells(text) - 2
            if names and room > 3:
                text += "  " + self._names_in(names, room)
        return _fit(text, width - 1)

    @staticmethod
    def _names_in(names, room):
        """Up to three names of files in flight in room cells; else the first, cut
        from the left, keeping its base name whole if it can (the same base name
        may be in many directories)."""
        for n in (3, 2, 1):
            shown = ", ".join(names[:n]) + (" ..." if len(names) > n else "")
            if n <= len(names) and _cells(shown) <= room:
                return shown
        base = names[0].rsplit("/", 1)[-1]
        cut = _fit_left(names[0], room)
        if len(cut) - 3 < len(base) and _cells(base) <= room:
            return base
        return cut

    def _draw(self, now):
        width = self.width()
        self._show([self.status_line(t, now, width) for t in self.tracks])

    def _show(self, lines):
        """Put lines on screen in place of the live display's last ones."""
        up = "\x1b[%dF" % self.drawn if self.drawn else "\r"
        self.err.write(up + "".join(line + "\x1b[K\n" for line in lines))
        self.err.flush()
        self.drawn = len(lines)

    def _clear(self):
        if self.drawn:
            self.err.write("\x1b[%dF\x1b[J" % self.drawn)
            self.drawn = 0

    def finish(self, interrupted=False):
        """Take the display down and print each destination's summary."""
        self._clear()
        self.err.flush()
        for t in self.tracks:
            s = t.sender
            if self.mode == "json":
                error = s.error or next(filter(None, map(_own_error, t.jobs)), None)
                self._event("summary", t, files_sent=s.files_done,
                            files_skipped=s.files_skipped, files_failed=t.failed,
                            bytes_sent=s.bytes_sent, bytes_resumed=s.bytes_resumed,
                            files_interrupted=t.interrupted() if interrupted else 0,
                            bytes_kept=s.bytes_kept if interrupted else 0,
                            seconds=round(time.monotonic() - t.started, 3),
                            ok=not (t.failed or interrupted) and s.error is None,
                            error=None if error is None else str(error))
                continue
            if s.fingerprint_new:
                self.say("xfer: trusting the TLS certificate of %s on first use: %s "
                         "(recorded in %s)" % (t.to, s.server_fingerprint, s.known_hosts))
            if s.error is not None:
                self.error(t, str(s.error))
            if self.mode != "quiet" and (s.error is None or t.label):
                self.say(t.summary(interrupted), self.out)


def _timeouts(seconds):
    """Sender keyword arguments for send --timeout SECONDS (None: the defaults)."""
    if seconds is None:
        return {}
    return dict(connect_timeout=seconds, handshake_timeout=seconds, timeout=seconds)


def _hint_missing_colon(config, operand):
    """Refuse a last FILE that does not exist but names a receiver (scp's HOST:)."""
    if operand == "-" or os.path.lexists(operand):
        return
    letter, colon, _ = operand.partition(":")
    if colon and len(letter) == 1 and letter in config.aliases():
        raise ConfigError("no such file %s; a single letter before ':' is a Windows drive, "
                          "so for the alias %s give --to %s" % (operand, letter,
                                                                operand.rstrip(":")))
    if "/" in operand or "\\" in operand:
        return
    # A bare IPv6 address (::1, or ::1:5000 with a port) is no HOST: to the
    # eye of scp either: it needs brackets, [::1]:5000:.
    head, _, port = operand.rpartition(":")
    meant = []
    if ":" in head and port.isdigit() and _is_ip(head):
        meant.append("[%s]:%s:" % (head, port))       # the last part a port
    if ":" in operand and _is_ip(operand):
        meant.append("[%s]:" % operand)               # the whole an address
    if meant:
        raise ConfigError("%s: no such file; did you mean %s ? (an IPv6 address needs "
                          "brackets)" % (operand, " or ".join(meant)))
    if operand in config.aliases():
        known = True
    else:
        try:
            socket.getaddrinfo(operand, None, type=socket.SOCK_STREAM)
            known = True
        except (OSError, UnicodeError):
            known = False
    if known:
        raise ConfigError("%s: no such file; did you mean %s: ? (a destination ends with "
                          "':', as with scp)" % (operand, operand))


def _without_user(config, dest):
    """dest without an scp-style USER@ (with a note): xfer has no user accounts."""
    head = dest.split(":", 1)[0]
    if "@" not in head or head in config.aliases():
        return dest
    user, _, rest = dest.partition("@")
    sys.stderr.write("xfer: note: ignoring '%s@' in %s: xfer has no user accounts; files "
                     "are written by whoever runs serve\n" % (_display(user), _display(dest)))
    return rest


def _check_resolvable(config, address, host):
    """Fail at once, listing the aliases, if address is neither an alias nor a known host."""
    if address is None or address.host in config.aliases() or _is_ip(host):
        return
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        if e.errno not in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", None)):
            return        # perhaps temporary: the Sender retries
        aliases = config.aliases()
        raise ConnectError("cannot resolve %s: %s; nor is it an alias (%s)" % (
            host, e.strerror, "known aliases: " + ", ".join(aliases) if aliases else
            "none configured: python3 xfer.py config add NAME HOST[:PORT] --token TOKEN"))
    except (OSError, UnicodeError):
        return


def _stdin_operand(args, paths):
    """Check the use of '-' (standard input) and --name before anything is read."""
    if "-" not in paths:
        if args.name is not None:
            raise ConfigError("--name names standard input: give '-' among the FILEs")
        return
    if args.command == "send-dir":
        raise ConfigError("'-' (standard input) goes with send, not send-dir")
    if paths.count("-") > 1:
        raise ConfigError("give '-' (standard input) once")
    name = args.name
    if name in ("", ".", ".."):
        raise ConfigError("--name %r: give the name the file gets on the receiver, such as "
                          "--name db.sql" % name)
    if name is not None and ("/" in name or "\\" in name):
        raise ConfigError("--name %s: a file name without '/'; give a directory as "
                          "HOST:DIR/" % name)


def _spool_stdin():
    """Copy standard input into a temporary file; return its path.

    The protocol announces a file's size before its bytes, so a stream is
    kept whole first (at most STDIN_MAX bytes, in the system's temporary
    directory) and then sent as an ordinary file (README "send and send-dir").
    """
    source = getattr(sys.stdin, "buffer", None)
    if source is None:
        raise ConfigError("'-': there is no standard input")
    if sys.stdin.isatty():
        raise ConfigError("'-': standard input is a terminal; pipe the data in, "
                          "e.g. tar c DIR | python3 xfer.py send - HOST:")
    fd, path = tempfile.mkstemp(prefix="xfer-stdin-")
    try:
        with open(fd, "wb") as out:
            total = 0
            while True:
                block = source.read(CHUNK)
                if not block:
                    break
                total += len(block)
                if total > STDIN_MAX:
                    raise XferError("'-': standard input is larger than %s; save it to a "
                                    "file and send that" % _human(STDIN_MAX))
                out.write(block)
        if os.name != "nt":
            # mkstemp makes it 0600; the receiver should get what a shell's
            # "> FILE" would have made.
            umask = os.umask(0o022)
            os.umask(umask)
            os.chmod(path, 0o666 & ~umask)
    except BaseException:
        os.unlink(path)
        raise
    return path


def _operand_problem(path, command, recursive):
    """Why a FILE or DIR operand cannot be sent, or None."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    if stat.S_ISDIR(st.st_mode):
        if command == "send" and not recursive:
            return "is a directory (use send -r or send-dir)"
        if not os.path.basename(os.path.abspath(path)):
            # A tree lands under its directory's name, and / has none.
            return "the root directory has no name to land under; send the folders in it"
        return None
    if command == "send-dir":
        return "not a directory"
    if not stat.S_ISREG(st.st_mode):
        return _NOT_REGULAR
    return None


def _token_source(error, source):
    """Say in a refused token's error where that token came from; return the error.

    The Sender's errors are the same objects its jobs carry, so the note is
    added to each once, whichever line prints it first."""
    if isinstance(error, AuthError) and error.of_token and source \
            and not getattr(error, "token_from", None):
        error.token_from = source
        error.args = ("%s (from %s)" % (error, source),)
    return error


def _report_mode(args):
    """The _Report mode of --json, -q, or the terminal (live) or not (plain)."""
    if args.json:
        return "json"
    if args.quiet:
        return "quiet"
    return "live" if _enable_ansi(sys.stderr) else "plain"


def _cmd_send(args):
    """send and send-dir: one Sender per destination, all polled from this thread."""
    config = _load_config(args)
    paths = list(args.paths)
    destinations = list(args.to or [])
    if _is_destination(paths[-1]):
        if destinations:
            raise ConfigError("give the destination once: --to HOST or a last "
                             "argument HOST:[DIR], not both")
        destinations.append(paths.pop())
    else:
        _hint_missing_colon(config, paths[-1])
    for path in paths:
        if _is_destination(path):
            raise ConfigError("%s: xfer sends local files only; write ./%s for a local "
                             "name with a colon" % (path, path))
    if not paths:
        raise ConfigError("nothing to send: give at least one %s before the destination"
                          % ("DIR" if args.command == "send-dir" else "FILE"))
    _stdin_operand(args, paths)
    if args.command == "send-dir" and not args.watch:
        for flag in ("--exclude", "--include", "--settle", "--interval"):
            if getattr(args, flag[2:]) not in (None, []):
                raise ConfigError("%s goes with --watch: send-dir without it sends every "
                                  "file of each DIR" % flag)
    mode = _report_mode(args)
    paired = _pair_for_send(args, config, destinations) if args.code else None
    report = _Report(mode, args.verbose)
    tracks = []
    for dest in destinations or [None]:
        address = _parse_address(_without_user(config, dest), dirs=True) if dest else None
        subdir = address.subdir if address else ""
        if paired is not None:
            target = paired
        else:
            target = _resolve_target(config, address, args.token, tls=args.tls,
                                     fingerprint=args.fingerprint, workers=args.workers)
            _check_resolvable(config, address, target.host)
        track, callbacks = report.track(
            "%s: " % dest if len(destinations) > 1 else "",
            _host_port_text(target.host, target.port), subdir)

        def on_error(job, report_error=callbacks["on_error"], source=target.token_from):
            _token_source(job.error, source)
            report_error(job)
        callbacks["on_error"] = on_error
        track.token_from = target.token_from
        track.sender = Sender(
            (target.host, target.port), workers=target.workers or 4, dispatch="poll",
            skip=None if args.force else ("checksum" if args.checksum else "quick"),
            retries=max(0, args.retries),
            # A watch reports its own files: one that failed for want of
            # the receiver is not an error, it waits for it.
            **dict({} if getattr(args, "watch", False) else callbacks,
                   **_timeouts(args.timeout), **_connection_options(args, target)))
        tracks.append(track)
    if getattr(args, "watch", False):
        return _watch_all(args, paths, tracks, report)
    spooled = _spool_stdin() if "-" in paths else None
    try:
        return _send_all(args, paths, tracks, report, mode, spooled)
    finally:
        if spooled is not None:
            os.unlink(spooled)


def _pair_for_send(args, config, destinations):
    """send --code: pair with the destination, or the one server on the LAN
    with a code open; a _Target with what pairing gave, saved nowhere."""
    if len(destinations) > 1:
        raise ConfigError("--code pairs with one server: give at most one destination")
    to = destinations[0] if destinations else None
    if to is not None and not isinstance(to, _Address):
        to = _parse_address(_without_user(config, to), dirs=True)
    host, port, tls = _pairing_server(config, to, usage="send --code CODE FILE... HOST:")
    token, fingerprint, _ = _pair(host, port, args.code, tls=tls,
                                  timeout=args.timeout or DEFAULT_HANDSHAKE_TIMEOUT)
    return _Target(host, port, token, bool(fingerprint), fingerprint, args.workers, False,
                   "the pairing code")


def _send_all(args, paths, tracks, report, mode, spooled):
    """Queue every operand on every destination, then report until all have ended."""
    for path in paths:
        if path == "-":
            for t in tracks:
                t.jobs.append(t.sender.queue(spooled, target_name=args.name or "stdin",
                                             subdir=t.subdir))
            continue
        why = _operand_problem(path, args.command, getattr(args, "recursive", False))
        if why:
            report.input_error(path, why)
            continue
        for t in tracks:
            t.jobs.append(t.sender.queue(path, subdir=t.subdir))
    return _follow(tracks, report, "sending the same again resumes")


def _follow(tracks, report, again):
    """Report on the queued jobs of every Sender until all have ended (Ctrl-C
    cancels them, and again says how to go on); the exit status."""
    with _Signals(("SIGINT",)) as stop:
        for t in tracks:
            while not stop.received and not t.sender.wait(report.REDRAW):
                for each in tracks:
                    each.sender.poll()
                report.tick()
    if stop.received:
        for t in tracks:
            t.sender.close(wait=False)
        # Let the workers end the cancelled files, so the summary counts them.
        deadline = time.monotonic() + CANCEL_GRACE
        for t in tracks:
            t.sender.wait(max(0.0, deadline - time.monotonic()))
            t.sender.poll()
        report.finish(interrupted=True)
        report.say("xfer: interrupted; %s" % again)
        return EXIT_INTERRUPTED
    for t in tracks:
        t.sender.close()
        t.sender.poll()
        _token_source(t.sender.error, t.token_from)
    report.finish()
    if len(tracks) == 1:
        error = tracks[0].sender.error or next(filter(None, map(_own_error, tracks[0].jobs)),
                                               None)
        if error is not None:
            return error.exit_code      # finish() printed it
    return EXIT_FAILED if any(t.failed or t.sender.error for t in tracks) else EXIT_OK


def _watch_all(args, paths, tracks, report):
    """send-dir --watch: watch every DIR for every destination until SIGTERM or Ctrl-C."""
    if "-" in paths:
        raise ConfigError("send-dir --watch watches folders; '-' (standard input) is not one")
    for path in paths:
        why = _operand_problem(path, args.command, False)
        if why:
            raise XferError("%s: %s" % (path, why))
    view = _WatchView(report)
    for t in tracks:
        for path in paths:
            view.add(t, path, t.sender.watch(
                path, subdir=t.subdir,
                settle=DEFAULT_SETTLE if args.settle is None else args.settle,
                interval=WATCH_INTERVAL if args.interval is None else args.interval,
                include=args.include, exclude=args.exclude))
    with _Signals() as stop:
        while not stop.received:
            view.tick()
            stop.wait(view.PAUSE)
        status = stop.exit_status()
        # Nothing new is queued; the file in flight finishes first, unless
        # a second signal gives up on it too.
        for w in view.watches():
            w.stop(wait=False)
        given_up = False
        while not all(w.stopped for w in view.watches()):
            if len(stop.received) > 1 and not given_up:
                given_up = True
                for t in tracks:
                    t.sender.close(wait=False)
            view.tick()
            stop.wait(0.05)
        for t in tracks:
            t.sender.close(wait=not given_up)
        view.tick()
    view.finish()
    return status


class _WatchView:
    """What send-dir --watch prints, on the main thread: a live line per folder
    and destination, lines for waits and errors, JSON events, the summaries."""

    PAUSE = 0.25        # seconds between looks at the watches (and redraws)

    def __init__(self, report):
        self.report = report
        self.rows = []              # (track, DIR as given, Watch)
        self.started = time.monotonic()

    def add(self, track, path, watch):
        self.rows.append((track, path, watch))

    def watches(self):
        return [w for _, _, w in self.rows]

    def tick(self):
        r = self.report
        for t, path, w in self.rows:
            t.sender.poll()
            for event in w.poll():
                self._event(t, path, w, event)
        now = time.monotonic()
        if r.mode == "live" and now - r.last_draw >= self.PAUSE:
            r.last_draw = now
            width = r.width()
            r._show([self.line(t, path, w, width) for t, path, w in self.rows])

    def line(self, t, path, w, width):
        """The live line: watching DIR: N sent, M pending, last: NAME, HH:MM:SS."""
        text = "%swatching %s: " % (t.label, _display(path))
        waiting = w.waiting or t.sender.error
        if waiting is not None:
            text += "waiting for %s, " % t.to
        text += "%d sent, %d pending" % (w.files_sent, w.pending)
        if w.last is not None:
            text += ", last: %s, %s" % (_display(w.last),
                                        time.strftime("%H:%M:%S", time.localtime(w.last_time)))
        if waiting is not None:         # last: the part a narrow terminal cuts
            text += " (%s)" % _display(str(waiting))
        return _fit(text, width - 1)

    def _event(self, t, path, w, e):
        r = self.report
        name = w.name + "/" + e.name if e.name else w.name
        if e.kind == "started":
            r._event("watch_started", t, dir=w.path, lands=w.name)
            if r.mode == "plain":
                r.say("%swatching %s, sending to %s" % (t.label, _display(path), t.to))
        elif e.kind == "pending":
            r._event("file_pending", t, path=name)
        elif e.kind == "changed":       # a "pending" follows
            if r.verbose:
                r.say("%s%s changed before it was stored; it goes again once complete"
                      % (t.label, _display(name)))
        elif e.kind == "sent":
            job = e.job
            r._event("file_done", t, path=name, bytes=job.size,
                     seconds=round(job.finished - job.started if job.started else 0.0, 6),
                     digest=job.digest, skipped=job.state == "skipped", resumed=job.resumed,
                     note=job.note or None)
            if r.verbose:
                r.say("%s%s %s (%s)" % (t.label, "skipped" if job.state == "skipped" else "sent",
                                        _display(name), _human(job.size)))
        elif e.kind == "failed":
            r._event("file_failed", t, path=name, reason=str(e.error),
                     exit=getattr(e.error, "exit_code", EXIT_FAILED))
            r.error(t, str(e.error))
        elif e.kind == "waiting":
            r._event("waiting", t, reason=str(e.error))
            if r.mode != "json":
                r.say("xfer: %swaiting for %s: %s" % (t.label, t.to, _display(str(e.error))))
        elif e.kind == "back":
            r._event("connected", t)
            if r.mode != "json":
                r.say("xfer: %s%s answers again" % (t.label, t.to))

    def finish(self):
        r = self.report
        r._clear()
        seconds = time.monotonic() - self.started
        for t, path, w in self.rows:
            if r.mode == "json":
                r._event("summary", t, dir=w.path, files_sent=w.files_sent,
                         files_skipped=w.files_skipped, files_failed=w.files_failed,
                         files_pending=w.pending, bytes_sent=w.bytes_sent,
                         seconds=round(seconds, 3), ok=not w.files_failed)
            elif r.mode != "quiet":
                line = "%sstopped watching %s after %s: sent %d file%s (%s)" % (
                    t.label, _display(path), _clock(seconds), w.files_sent,
                    "" if w.files_sent == 1 else "s", _human(w.bytes_sent))
                if w.files_skipped:
                    line += ", %d already there" % w.files_skipped
                if w.files_failed:
                    line += ", %d FAILED" % w.files_failed
                if w.pending:
                    line += ", %d not sent yet" % w.pending
                r.say(line, r.out)


def _cmd_bench(args):
    """Measure throughput to a receiver's discard sink (nothing is stored)."""
    server = None
    source = None           # where the token came from
    if args.to:
        target = _resolve_target(_load_config(args), args.to, args.token, tls=args.tls,
                                 fingerprint=args.fingerprint)
        source = target.token_from
        kwargs = _connection_options(args, target)
        address = (target.host, target.port)
        where = "to %s" % _host_port_text(*address)
    else:
        import tempfile
        token = _new_token()
        empty = tempfile.mkdtemp(prefix="xfer-bench-")
        argv = [sys.executable, os.path.abspath(__file__), "serve", "--host", "127.0.0.1",
                "--port", "0", "--dir", os.path.join(empty, "in"), "-q"]
        kwargs = dict(token=token)
        if args.tls or args.fingerprint:
            # --tls measures TLS here too: a certificate of its own, pinned.
            try:
                cert, key = _ensure_certificate(os.path.join(empty, "tls"))
            except XferError:
                shutil.rmtree(empty, ignore_errors=True)
                raise
            argv += ["--tls-cert", cert, "--tls-key", key]
            kwargs.update(tls=True, fingerprint=cert_fingerprint(_certificate_der(cert)))
        # The token in the environment, not on the command line, where any
        # local user could read it (README "Security").
        server = subprocess.Popen(argv, stdout=subprocess.PIPE, universal_newlines=True,
                                  env=dict(os.environ, XFER_TOKEN=token))
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            server.kill()
            shutil.rmtree(empty, ignore_errors=True)
            raise XferError("the loopback server did not start")
        address = ("127.0.0.1", int(line.rsplit(":", 1)[1]))
        where = "over loopback to a server in another process"
    emit = _json_writer(sys.stdout) if args.json else None
    if emit:
        emit("bench_started", to=_host_port_text(*address), auth=bool(kwargs.get("token")),
             tls=bool(kwargs.get("tls")))
    else:
        print("xfer %s bench %s, discard sink, sha256 and %s%s" % (
            __version__, where, "tags on" if kwargs.get("token") else "no token",
            ", TLS" if kwargs.get("tls") else ""))
    worst = [0.0, 0]
    try:
        phases = (("large", [("bench/large.bin", args.size)]),
                  ("small", [("bench/small/%06d" % i, args.file_size)
                             for i in range(args.files)]))
        for phase, files in phases:
            try:
                seconds = _bench_phase(address, kwargs, args.workers, files, worst)
            except XferError as e:
                raise _token_source(e, source)
            size = sum(n for _, n in files)
            if emit:
                emit("bench_phase", phase=phase, files=len(files), bytes=size,
                     seconds=round(seconds, 6), rate=round(size / seconds),
                     files_per_second=round(len(files) / seconds, 1))
            elif phase == "large":
                print("large file:  %s in %.2f s = %s/s" % (_human(size), seconds,
                                                           _human(size / seconds)))
            else:
                print("small files: %d x %s in %.2f s = %.0f files/s (%s/s)" % (
                    len(files), _human(args.file_size), seconds, len(files) / seconds,
                    _human(size / seconds)))
        if emit:
            emit("bench_done", poll_worst_ms=round(worst[0] * 1000, 3), poll_calls=worst[1])
        else:
            print("poll(): worst %.3f ms over %d calls at up to 60 Hz (dispatch=\"poll\")"
                  % (worst[0] * 1000, worst[1]))
    finally:
        if server is not None:
            server.terminate()
            server.wait()
            shutil.rmtree(empty, ignore_errors=True)
    return EXIT_OK


def _bench_phase(address, kwargs, workers, files, worst):
    """Send generated files; poll like a host's frame loop; return the seconds taken."""
    failures = []
    sender = Sender(address, workers=workers or 4, dispatch="poll", discard=True,
                    on_progress=lambda job: None, on_error=failures.append, **kwargs)
    started = time.monotonic()
    pending = iter(files)
    for name, size in itertools.islice(pending, 4 * WINDOW):
        sender._queue_generated(name, size)
    while True:
        for name, size in itertools.islice(pending, 4 * WINDOW):
            sender._queue_generated(name, size)
        t0 = time.perf_counter()
        sender.poll()
        worst[0] = max(worst[0], time.perf_counter() - t0)
        worst[1] += 1
        if sender.wait(1 / 60.0):
            break
    seconds = time.monotonic() - started
    sender.close()
    sender.poll()
    if sender.error is not None:
        raise sender.error
    if failures:
        raise XferError("%d benchmark files failed: %s" % (len(failures), failures[0].error))
    return max(seconds, 1e-9)


def _cmd_ping(args):
    """Health check: connect, authenticate, PING; one line, exit 0 if all is well."""
    target = _resolve_target(_load_config(args), args.host, args.token, tls=args.tls,
                             fingerprint=args.fingerprint)
    tls = target.tls
    where = _host_port_text(target.host, target.port)
    sender = Sender((target.host, target.port), **dict(_connection_options(args, target),
                                                      **_timeouts(args.timeout)))
    try:
        state = sender.ping()
    except XferError as e:
        _token_source(e, target.token_from)
        if not args.json:
            raise
        _json_writer(sys.stdout)("ping", to=where, ok=False, error=str(e), exit=e.exit_code)
        return e.exit_code
    if args.json:
        _json_writer(sys.stdout)("ping", to=where, ok=True, version=state["version"],
                                 free=state["free"], total=state["total"],
                                 rtt=round(state["rtt"], 6))
    elif not args.quiet:
        print("%s: xfer %s up, %s free of %s, round trip %.1f ms%s" % (
            where, state["version"], _human(state["free"]), _human(state["total"]),
            state["rtt"] * 1000, ", TLS" if tls else ""))
    return EXIT_OK


def _remote_operands(config, operands, what):
    """HOST:PATH operands of one host: (host text, [remote path, ...])."""
    hosts, paths = set(), []
    for operand in operands:
        if not _is_destination(operand):
            raise ConfigError("%s: %s takes HOST:PATH (a path below the server's DIR)"
                              % (operand, what))
        address = _parse_address(_without_user(config, operand), dirs=True)
        hosts.add((address.host, address.port))
        paths.append(address.subdir)
    if len(hosts) > 1:
        raise ConfigError("%s: every HOST:PATH must name the same host" % what)
    host, port = hosts.pop()
    return _Address(host, port, ""), paths


def _pull_sender(args, config, address, **kw):
    if getattr(args, "code", None):
        target = _pair_for_send(args, config, [address])
    else:
        target = _resolve_target(config, address, args.token, tls=args.tls,
                                 fingerprint=args.fingerprint)
        _check_resolvable(config, address, target.host)
    if getattr(args, "force", False):
        skip = None
    else:
        skip = "checksum" if getattr(args, "checksum", False) else "quick"
    sender = Sender((target.host, target.port), skip=skip,
                    retries=max(0, getattr(args, "retries", 3)),
                    **dict(_timeouts(args.timeout), **_connection_options(args, target), **kw))
    return sender, target


def _cmd_get(args):
    """get: copy files and trees from the server's DIR into LOCAL_DIR, shown
    as a send is (the same report, its events marked "direction": "get")."""
    config = _load_config(args)
    operands = list(args.paths)
    local_dir = "."
    if len(operands) > 1 and not _is_destination(operands[-1]):
        local_dir = operands.pop()
    address, remotes = _remote_operands(config, operands, "get")
    report = _Report(_report_mode(args), args.verbose)
    track, callbacks = report.track("", None, direction="get")   # its address: below
    report_error = callbacks["on_error"]

    def on_error(job):
        _token_source(job.error, track.token_from)
        report_error(job)
    callbacks["on_error"] = on_error
    track.sender, target = _pull_sender(args, config, address, dispatch="poll", **callbacks)
    track.to = _host_port_text(target.host, target.port)
    track.token_from = target.token_from
    # What serve protects, a get into the home directory protects too.
    protect = _serve_protected(config, _settings_path(args), None, None)
    for remote in remotes:
        track.jobs.append(track.sender.get(remote, local_dir, args.overwrite or "replace",
                                           protect))
    return _follow([track], report, "getting the same again resumes")


_ENTRY_LETTERS = {"file": "-", "dir": "d", "link": "l", "other": "?"}


def _cmd_ls(args):
    """ls: list a directory of the server's DIR, like ls -l; streamed."""
    config = _load_config(args)
    address, remotes = _remote_operands(config, [args.path], "ls")
    sender, target = _pull_sender(args, config, address)
    emit = _json_writer(sys.stdout) if args.json else None
    out = sys.stdout
    closed = []         # the reader went away (ls | head): the rest is dropped

    def on_entry(entry):
        if closed:
            return
        kind, size, mtime_ns, mode, name = entry
        try:
            if emit:
                emit("entry", type=kind, size=size, mtime=mtime_ns / 1e9,
                     mode="%04o" % mode, path=name)
                return
            out.write("%s%s %12s %s %s%s\n" % (
                _ENTRY_LETTERS[kind], stat.filemode(mode)[1:], "{:,}".format(size),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime_ns / 1e9)),
                _display(name), "/" if kind == "dir" else ""))
        except BrokenPipeError as e:
            closed.append(e)

    job = sender.list(remotes[0], args.recursive, on_entry)
    sender.close()
    if closed:
        raise closed[0]         # main() ends quietly
    if job.error is not None:
        _token_source(job.error, target.token_from)
        raise job.error
    return EXIT_OK


def _discovery_scope(environ=None):
    """Where a query went, for a message: XFER_DISCOVER_ADDR or the broadcast."""
    environ = os.environ if environ is None else environ
    spec = environ.get("XFER_DISCOVER_ADDR")
    return "XFER_DISCOVER_ADDR=%s" % spec if spec else "a broadcast on the LAN"


def _pairing_server(config, to, port=DEFAULT_PORT, usage="pair CODE HOST[:PORT]"):
    """(host, port, tls) of the server to pair with: to (HOST[:PORT] or an
    alias) if given, else the one server on the LAN with a code open; usage
    is the command that names it, for the errors."""
    if to:
        address = to if isinstance(to, _Address) else _parse_address(to)
        if address.host in config.aliases():
            target = _resolve_target(config, address)
            return target.host, target.port, target.tls
        return address.host, address.port or DEFAULT_PORT, False
    found = _discover(port=port)
    open_ = [entry for entry in found if entry["pairing"]]
    if not open_ and found:
        raise AuthError("no pairing code is open on %s (asked %s): %s" % (", ".join(
            "%s at %s" % (e["name"], _host_port_text(e["host"], e["port"])) for e in found),
            _discovery_scope(), _NEW_CODE_HINT))
    if not open_:
        raise ConnectError("no xfer server answered (asked %s); give its address: "
                           "python3 xfer.py %s" % (_discovery_scope(), usage))
    if len(open_) > 1:
        raise ConfigError("%d servers have a pairing code open (%s); say which: python3 "
                          "xfer.py %s" % (len(open_), ", ".join(
                              "%s at %s" % (e["name"], _host_port_text(e["host"], e["port"]))
                              for e in open_), usage))
    entry = open_[0]
    return entry["host"], entry["port"], entry["tls"]


def _alias_for(config, host, port):
    """The alias already saved for host:port, or None."""
    for alias in config.aliases():
        entry = config.get(alias, "host")
        if (entry[0] if entry else alias) == host and (config.port(alias) or DEFAULT_PORT) == port:
            return alias
    return None


def _cmd_pair(args):
    """pair CODE [HOST]: the pairing exchange, then an alias in the per-user config."""
    code = _normalize_code(args.code)
    path = _settings_path(args)
    _check_savable(path)            # before the code is used up
    config = _load_config(args)
    if args.name is not None:
        _check_alias(args.name)
        taken = _saved_alias(path, args.name)
        if taken is not None:
            raise ConfigError("alias %s already names %s in %s; choose another --name, or "
                              "remove it first: python3 xfer.py config remove %s"
                              % (args.name, _host_port_text(*taken), path, args.name))
    host, port, tls = _pairing_server(config, args.host)
    token, fingerprint, name = _pair(host, port, code, tls=tls, timeout=args.timeout)
    alias = args.name or _server_name(name)
    taken = _saved_alias(path, alias)
    if taken is not None and taken != (host, port) and args.name is None:
        # The code is used up: keep what it gave under a free name.
        base = alias
        alias = next("%s-%d" % (base, n) for n in itertools.count(2)
                     if _saved_alias(path, "%s-%d" % (base, n)) is None)
        print("alias %s already names %s; saving this server as %s"
              % (base, _host_port_text(*taken), alias))
    _save_alias(path, alias, host, port, token, fingerprint, bool(fingerprint))
    if not args.quiet:
        print("paired with %s%s; send with:  python3 xfer.py send FILE... %s:"
              % (name, " (TLS, certificate pinned)" if fingerprint else "", alias))
    return EXIT_OK


def _cmd_find(args):
    """find: the servers that answer a discovery query, one line each."""
    config = _load_config(args)
    found = _discover(wait=args.wait, port=args.port)
    if args.json:
        write = _json_writer(sys.stdout)
        for e in found:
            write("server", server=e["name"], address=_host_port_text(e["host"], e["port"]),
                  version=e["version"], pairing=e["pairing"], tls=e["tls"], auth=e["auth"],
                  alias=_alias_for(config, e["host"], e["port"]))
    elif not args.quiet:
        for e in found:
            alias = _alias_for(config, e["host"], e["port"])
            print("%-16s %-24s xfer %s%s%s%s%s" % (
                e["name"], _host_port_text(e["host"], e["port"]), e["version"],
                "" if e["protocol"] == PROTOCOL_VERSION else
                " (protocol %d, this one speaks %d)" % (e["protocol"], PROTOCOL_VERSION),
                ", TLS" if e["tls"] else "", ", pairing code open" if e["pairing"] else "",
                ", alias %s" % alias if alias else ""))
    if not found:
        raise ConnectError("no xfer server answered within %g s (asked %s)"
                           % (args.wait, _discovery_scope()))
    return EXIT_OK


def _mask(token):
    return token[:4] + "*" * 8 if token else "(none)"


def _saved_alias(path, name):
    """(host, port) of alias name in the file at path, or None."""
    if not os.path.exists(path):
        return None
    old = Config()
    _read_ini(old, path)
    if name not in old.sections:
        return None
    entry = old.own(name, "host")
    return entry[0] if entry else name, old.port(name) or DEFAULT_PORT


def _check_alias(name):
    """Refuse an alias a destination cannot spell (NAME:, --to NAME) or a
    section header cannot hold."""
    if name in ("DEFAULT", "serve"):
        raise ConfigError("%r is reserved; choose another alias" % name)
    if not name or not all(c.isalnum() or c in "._-" for c in name):
        raise ConfigError("alias %r: an alias is letters, digits, '.', '-' and '_'" % name)


def _save_alias(path, name, host, port, token=None, fingerprint=None, tls=False):
    """Save alias name -> host:port (config add, pair), saying if it replaces one."""
    values = {"host": host, "port": port, "token": token,
              "fingerprint": fingerprint, "tls": "yes" if tls else None}
    _check_alias(name)
    old = _saved_alias(path, name)
    if old is not None:
        print("replacing alias %s (was %s)" % (name, _host_port_text(*old)))
    _save_settings(path, name, values)
    print("added %s -> %s in %s" % (name, _host_port_text(host, port or DEFAULT_PORT), path))


def _cmd_config(args):
    path = _settings_path(args)
    if args.action == "add":
        host, port, _ = _parse_address(args.address)
        _save_alias(path, args.name, host, port, args.token, args.fingerprint, args.tls)
        return EXIT_OK
    if args.action == "remove":
        _save_settings(path, args.name, remove=True)
        print("removed %s from %s" % (args.name, path))
        return EXIT_OK
    config = _load_config(args)
    print("files read (first wins): %s" % (", ".join(config.files) or "none"))
    print("written by 'config add' and 'serve': %s" % path)
    if config.serverinfo is not None:
        print("serverinfo.py: %s:%s (%s)" % config.serverinfo)
    for section in ["DEFAULT", "serve"] + config.aliases():
        items = config.sections.get(section)
        if not items:
            continue
        print("[%s]" % section)
        for key in sorted(items):
            value = items[key][0]
            print("  %s = %s" % (key, _mask(value) if key == "token" else value))
    return EXIT_OK


def _positive_int(text):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text) from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1: %r" % text)
    return n


def _workers_arg(text):
    n = _positive_int(text)
    if n > MAX_WORKERS:
        raise argparse.ArgumentTypeError("at most %d: %r" % (MAX_WORKERS, text))
    return n


def _seconds_arg(text, zero=False, unit=1, units="seconds"):
    """A time option: a number of seconds (or of units, unit seconds each)
    that a socket or a wait can take, as _seconds_fit says."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number of %s: %r" % (units, text)) from None
    if not _seconds_fit(value * unit, zero):
        raise argparse.ArgumentTypeError("must be %s 0 and at most %d%s: %r" % (
            "at least" if zero else "more than", SECONDS_MAX // unit,
            "" if unit == 1 else " " + units, text))
    return value


def _grace_arg(text):
    return _seconds_arg(text, zero=True)


def _days_arg(text):
    """A number of days (--partial-max-age)."""
    return _seconds_arg(text, zero=True, unit=86400, units="days")


def _port_arg(text):
    try:
        return _port_number(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def _parse_size(text):
    """Bytes from "500M", "2G", "10GiB", "4096" (decimal units, or binary with "i")."""
    t = text.strip().lower()
    if t.endswith("b"):
        t = t[:-1]
    num = t.rstrip("kmgti")
    try:
        value = int(float(num) * _SIZE_UNITS[t[len(num):]])
    except (ValueError, KeyError):
        raise ValueError("not a size: %r (examples: 500M, 2G, 10GiB)" % text) from None
    if value < 0:
        raise ValueError("not a size: %r (examples: 500M, 2G, 10GiB)" % text)
    return value


def _fingerprint_arg(text):
    try:
        return _check_fingerprint(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size_arg(text):
    try:
        return _parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parser_class():
    """_Parser, an ArgumentParser; made with intermixed=True, its options may
    follow its operands, as scp and rsync allow (send a.tif -v pi:).  Defined
    on first use, so that only a command line imports argparse."""

    class _Parser(argparse.ArgumentParser):
        def __init__(self, *args, intermixed=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.intermixed = intermixed
            self._mixing = False

        def parse_known_args(self, args=None, namespace=None):
            # parse_known_intermixed_args calls parse_known_args itself, twice.
            if not self.intermixed or self._mixing:
                return super().parse_known_args(args, namespace)
            args = list(sys.argv[1:] if args is None else args)
            # Its first pass drops "--", so its second took the operands
            # after it for options (send -- -a.tif pi: was "unrecognized
            # arguments").  They stand in as a name no command line can
            # hold (argv has no NUL), and come back once parsed.
            stand_in = {}
            if "--" in args:
                cut = args.index("--")
                for arg in args[cut + 1:]:
                    if arg.startswith(tuple(self.prefix_chars)) and arg not in stand_in:
                        stand_in[arg] = "\0%d" % len(stand_in)
                args = args[:cut] + [stand_in.get(arg, arg) for arg in args[cut + 1:]]
            operands = {key: arg for arg, key in stand_in.items()}
            self._mixing = True
            try:
                namespace, extras = self.parse_known_intermixed_args(args, namespace)
            finally:
                self._mixing = False
            for key, value in vars(namespace).items():
                if isinstance(value, list):
                    setattr(namespace, key, [operands.get(v, v) if isinstance(v, str) else v
                                             for v in value])
                elif isinstance(value, str):
                    setattr(namespace, key, operands.get(value, value))
            return namespace, [operands.get(arg, arg) for arg in extras]
    return _Parser


def _build_parser():
    parser = _parser_class()(
        prog="xfer", description="Move files between machines on a local network.")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True   # set after construction: required= with dest needs 3.7+

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE",
                        help="read (and write) this config file only")
    common.add_argument("--token", help="shared secret (or XFER_TOKEN)")
    common.add_argument("-q", "--quiet", action="store_true", help="print only errors")
    common.add_argument("--json", action="store_true",
                        help="print one JSON object per event on stdout (README \"JSON events\")")
    # What every command that connects to a server takes.
    client = argparse.ArgumentParser(add_help=False, parents=[common])
    client.add_argument("--tls", action="store_true", help="connect with TLS")
    client.add_argument("--fingerprint", metavar="SHA256", type=_fingerprint_arg,
                        help="the server certificate's fingerprint (implies --tls)")

    p = sub.add_parser("serve", parents=[common], help="receive files into a directory")
    p.add_argument("--dir", help="destination directory (default: current directory)")
    p.add_argument("--host", help="address to listen on (default 0.0.0.0, all IPv4)")
    p.add_argument("--port", type=_port_arg, help="port (default %d; 0 picks a free one)"
                   % DEFAULT_PORT)
    p.add_argument("--no-auth", action="store_true",
                   help="accept files from anyone who can connect (no token)")
    p.add_argument("--allow-get", action="store_true",
                   help="let clients with the token read DIR (get, ls), read-only")
    p.add_argument("--allow-home", action="store_true",
                   help="let DIR be the home directory (or hold xfer's own config); names "
                   "that reach xfer's config, keys or known_hosts are still refused")
    p.add_argument("--tls", action="store_true",
                   help="serve TLS with a self-signed certificate (made with openssl)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this PEM certificate")
    p.add_argument("--tls-key", metavar="FILE", help="private key for --tls-cert")
    p.add_argument("--max-connections", type=_positive_int, metavar="N",
                   help="concurrent connections before 'busy' (default %d)"
                   % DEFAULT_MAX_CONNECTIONS)
    p.add_argument("--max-size", type=_size_arg, metavar="SIZE",
                   help="refuse files larger than SIZE (e.g. 20G)")
    p.add_argument("--idle-timeout", type=_seconds_arg, metavar="SECONDS",
                   default=DEFAULT_IDLE_TIMEOUT,
                   help="drop a connection silent this long (default %g)"
                   % DEFAULT_IDLE_TIMEOUT)
    p.add_argument("--handshake-timeout", type=_seconds_arg, metavar="SECONDS",
                   default=DEFAULT_HANDSHAKE_TIMEOUT,
                   help="drop a connection not authenticated this soon (default %g)"
                   % DEFAULT_HANDSHAKE_TIMEOUT)
    p.add_argument("--max-path", type=_positive_int, metavar="BYTES", default=MAX_PATH_BYTES,
                   help="refuse longer relative paths (default %d)" % MAX_PATH_BYTES)
    p.add_argument("--max-depth", type=_positive_int, metavar="N", default=MAX_PATH_DEPTH,
                   help="refuse deeper paths (default %d)" % MAX_PATH_DEPTH)
    p.add_argument("--portable-names", action="store_true",
                   help="refuse names Windows cannot store, on any OS")
    p.add_argument("--overwrite", choices=OVERWRITE_POLICIES,
                   help="when a file's name is taken: replace it atomically (default), "
                   "rename the new one 'NAME (1).EXT', skip it, or fail")
    p.add_argument("--grace", type=_grace_arg, metavar="SECONDS", default=DEFAULT_GRACE,
                   help="on Ctrl-C/SIGTERM, let files in flight finish this long "
                   "(default %g)" % DEFAULT_GRACE)
    p.add_argument("--partial-max-age", type=_days_arg, metavar="DAYS", default=7.0,
                   help="delete partial files older than this at start-up (default 7)")
    p.add_argument("--once", action="store_true",
                   help="exit after the first sender has finished (status 0 if every "
                   "file arrived)")
    p.add_argument("--on-receive", metavar="CMD",
                   help="run CMD FINAL_PATH for every file received and verified "
                   "(README \"Hooks\")")
    p.add_argument("--no-discovery", action="store_true",
                   help="answer no discovery queries (find, pair without HOST)")
    p.add_argument("--no-web", action="store_true",
                   help="serve no web page and no HTTP API on the port (README \"HTTP API\")")
    p.add_argument("--hook-timeout", type=_seconds_arg, metavar="SECONDS",
                   default=DEFAULT_HOOK_TIMEOUT,
                   help="stop a hook still running after this long (default %g)"
                   % DEFAULT_HOOK_TIMEOUT)
    p.set_defaults(func=_cmd_serve)

    for name, what, help_ in (
            ("send", "FILE", "send files into the server's directory"),
            ("send-dir", "DIR", "send directory trees, keeping their structure")):
        p = sub.add_parser(name, parents=[client], help=help_, intermixed=True)
        p.add_argument("--to", metavar="HOST[:PORT][:DIR]", action="append",
                       help="receiver address or config alias (or XFER_HOST); give it "
                       "again to send to several receivers at once")
        p.add_argument("--workers", type=_workers_arg, metavar="N",
                       help="parallel connections (default 4)")
        p.add_argument("--checksum", action="store_true",
                       help="skip a file only if the receiver's copy has the same sha256 "
                       "(default: same size and modification time)")
        p.add_argument("--force", action="store_true",
                       help="send every file, even one the receiver already has")
        p.add_argument("--retries", type=int, metavar="N", default=3,
                       help="tries again after a transient failure (default 3)")
        p.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS",
                       help="give up on a receiver silent this long, connecting, in the "
                       "handshake or mid-transfer (default %g, %g and %g)"
                       % (DEFAULT_CONNECT_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT,
                          DEFAULT_IO_TIMEOUT))
        p.add_argument("-v", "--verbose", action="store_true", help="one line per file")
        p.add_argument("--code", metavar="CODE",
                       help="pair with the server showing this pairing code and send to it, "
                       "saving nothing (a one-off copy)")
        if name == "send":
            p.add_argument("-r", "--recursive", action="store_true",
                           help="send a directory operand as a tree, as send-dir does")
            p.add_argument("--name", metavar="NAME",
                           help="name on the receiver for '-' (standard input; default "
                           "'stdin')")
        else:
            p.set_defaults(name=None)
            p.add_argument("--watch", action="store_true",
                           help="keep running: send each new or changed file once it is "
                           "complete, until SIGTERM or Ctrl-C")
            p.add_argument("--settle", type=_seconds_arg, metavar="SECONDS",
                           help="--watch: a file is complete once its size and time stay "
                           "the same this long (default %g)" % DEFAULT_SETTLE)
            p.add_argument("--interval", type=_seconds_arg, metavar="SECONDS",
                           help="--watch: look at the folder this often (default %g)"
                           % WATCH_INTERVAL)
            p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                           help="--watch: never send names matching PATTERN (again for "
                           "more); %s are never sent" % ", ".join(WATCH_IGNORE))
            p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                           help="--watch: send only names matching PATTERN (again for more)")
        p.add_argument("paths", nargs="+", metavar=what,
                       help="%ss to send ('-' for standard input); a last HOST:[DIR] is the "
                       "destination" % what if name == "send" else
                       "%ss to send; a last HOST:[DIR] is the destination" % what)
        p.set_defaults(func=_cmd_send)

    p = sub.add_parser("get", parents=[client], intermixed=True,
                       help="copy files and trees from the server's directory")
    p.add_argument("--force", action="store_true",
                   help="copy every file, even one LOCAL_DIR already has (default: skip "
                   "those of the same size and modification time)")
    p.add_argument("--checksum", action="store_true",
                   help="skip a file only if LOCAL_DIR's copy has the same sha256 "
                   "(default: same size and modification time)")
    p.add_argument("--overwrite", choices=OVERWRITE_POLICIES,
                   help="when a local name is taken: replace it atomically (default), "
                   "rename the new one 'NAME (1).EXT', skip it, or fail")
    p.add_argument("--retries", type=int, metavar="N", default=3,
                   help="tries again after a transient failure (default 3)")
    p.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS",
                   help="give up on a server silent this long (default as for send)")
    p.add_argument("--workers", type=_workers_arg, metavar="N",
                   help="accepted for send's sake; get uses one connection")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per file")
    p.add_argument("--code", metavar="CODE",
                   help="pair with HOST using the pairing code it shows, saving nothing")
    p.add_argument("paths", nargs="+", metavar="HOST:PATH",
                   help="what to copy, below the server's DIR; a last plain path is "
                   "LOCAL_DIR (default .)")
    p.set_defaults(func=_cmd_get)

    p = sub.add_parser("ls", parents=[client],
                       help="list a directory of the server's directory")
    p.add_argument("path", metavar="HOST:[PATH]")
    p.add_argument("-R", "--recursive", action="store_true", help="the whole tree")
    p.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS",
                   help="give up on a server silent this long")
    p.set_defaults(func=_cmd_ls)

    p = sub.add_parser("ping", parents=[client],
                       help="check that a server is up and the token works")
    p.add_argument("host", nargs="?", metavar="HOST[:PORT]",
                   help="server address or config alias (default as for send)")
    p.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS",
                   default=DEFAULT_CONNECT_TIMEOUT,
                   help="give up after this long (default %g)" % DEFAULT_CONNECT_TIMEOUT)
    p.set_defaults(func=_cmd_ping)

    p = sub.add_parser("pair", parents=[common],
                       help="pair with a server using the code its banner shows")
    p.add_argument("code", metavar="CODE", help="the pairing code, e.g. 7-castle-river")
    p.add_argument("host", nargs="?", metavar="HOST[:PORT]",
                   help="the server (default: the one on the LAN with a code open)")
    p.add_argument("--name", metavar="ALIAS",
                   help="alias to save it as (default: the server's own name)")
    p.add_argument("--timeout", type=_seconds_arg, metavar="SECONDS",
                   default=DEFAULT_HANDSHAKE_TIMEOUT,
                   help="give up after this long (default %g)" % DEFAULT_HANDSHAKE_TIMEOUT)
    p.set_defaults(func=_cmd_pair)

    p = sub.add_parser("find", parents=[common], help="list the xfer servers on the LAN")
    p.add_argument("--port", type=_port_arg, default=DEFAULT_PORT,
                   help="port the servers listen on (default %d)" % DEFAULT_PORT)
    p.add_argument("--wait", type=_seconds_arg, metavar="SECONDS", default=DISCOVER_WAIT,
                   help="how long to wait for answers (default %g)" % DISCOVER_WAIT)
    p.set_defaults(func=_cmd_find)

    p = sub.add_parser("bench", parents=[client],
                       help="measure throughput to a server's discard sink")
    p.add_argument("--to", metavar="HOST[:PORT]",
                   help="server to measure (default: one started on loopback)")
    p.add_argument("--workers", type=_workers_arg, metavar="N", help="connections (default 4)")
    p.add_argument("--size", type=_size_arg, default=256 * 2**20, metavar="SIZE",
                   help="large file size (default 256MiB)")
    p.add_argument("--files", type=_positive_int, default=5000, metavar="N",
                   help="number of small files (default 5000)")
    p.add_argument("--file-size", type=_size_arg, default=4096, metavar="SIZE",
                   help="small file size (default 4KiB)")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("config", help="show the settings, add or remove host aliases")
    p.add_argument("--config", metavar="FILE", help="use this config file")
    csub = p.add_subparsers(dest="action", metavar="ACTION")
    csub.add_parser("show", help="print the effective settings (tokens masked)")
    c = csub.add_parser("add", help="add or update a host alias")
    c.add_argument("name", metavar="NAME")
    c.add_argument("address", metavar="HOST[:PORT]")
    c.add_argument("--token", help="the server's token")
    c.add_argument("--fingerprint", metavar="SHA256", type=_fingerprint_arg,
                   help="pin the server's TLS certificate")
    c.add_argument("--tls", action="store_true", help="connect with TLS (pin on first use)")
    c = csub.add_parser("remove", help="remove a host alias")
    c.add_argument("name", metavar="NAME")
    p.set_defaults(func=_cmd_config, action="show")
    return parser


def main(argv=None):
    """Run the command line; return the process exit status.

    argv defaults to sys.argv[1:].  Usage errors exit through argparse (2).
    """
    # pythonw.exe (the Windows recipe in README "Running as a service")
    # starts a program with sys.stdout and sys.stderr set to None.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except XferError as e:
        sys.stderr.write("xfer: error: %s\n" % _display(str(e), limit=2000))
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("\nxfer: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _drop_stream(sys.stdout)
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
