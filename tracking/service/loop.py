"""The real-time service: ZeroMQ endpoints, threads, clocks; decisions are the :class:`~spineguide.tracking.service.states.Engine`'s.

Threads and the sockets they own (a socket is used by exactly one thread):

- **io** owns the frames PULL and the command ROUTER. It decodes and
  validates every inbound message (``WireLimits``), pairs frames by
  ``pair_id`` (a partner missing after ``pair_timeout_s`` -> HOLD
  ``unpaired_frame``), and puts only the newest complete pair into a
  one-slot :class:`Mailbox` (an older unprocessed pair is dropped and
  counted: never a backlog). Commands are answered at once, even while a
  registration runs (the engine lock is never held during one).
- **worker** takes pairs from the mailbox, runs the registration
  (:func:`~spineguide.tracking.service.states.run_processor`, outside the lock) and lets the
  engine judge the result.
- **publisher** owns the PUB socket. It takes outgoing bodies from a
  thread-safe queue (the engine's ``emit``), stamps ``seq`` at send time,
  sends ``heartbeat/1`` every ``heartbeat_period_s`` on its own clock, and
  runs the engine's timer (silence and ENABLE expiry) at every heartbeat and
  exactly at each ENABLE's expiry. A ``queue.SimpleQueue`` rather than an
  inproc PUSH/PULL pair feeds it: it is thread-safe, needs no socket per
  producer, and its timed ``get`` is the publisher's clock.
- **record-writer** (:class:`~spineguide.tracking.service.record.SessionRecord`) owns the file.

Replay (:func:`replay_session`) feeds a recorded session through a fresh
engine with the recorded clock values and reports every difference.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from ..errors import CommandRefused, FrameError, SecurityError, TrackingError, WireSchemaError
from .config import INSECURE_WARNING, PlanConfig, ServiceConfig, config_from_dict, log_config
from .gating import Beam, HoldReason
from .pairing import CompletePair, FrameAccepted, FramePairer, NewEpoch, PairFault, ViewReturned
from .processing import PairProcessor, PairResult, build_processor
from .record import SessionRecord, frames_folder, read_record
from .security import Authenticator, Role, authorize_command, make_server_socket_secure, user_id_of
from .states import Engine, run_processor
from .wire import (
    NonFinitePixelsError,
    PayloadSizeError,
    WireLimits,
    decode_command,
    decode_kvframe,
    encode_heartbeat,
    encode_message,
    encode_reply,
)

__all__ = ["Mailbox", "Service", "ServiceStats", "ReplayReport", "replay_session"]

log = logging.getLogger(__name__)

#: Longest an idle poll waits, ms (bounds how long ``stop()`` takes).
_POLL_MS = 10
#: Token bucket for commands: sustained rate and burst. Beyond it a command is refused ("rate limited").
COMMAND_RATE_PER_S = 200.0
COMMAND_BURST = 50
#: PUB high-water mark: messages queued per subscriber before a slow one starts losing them.
PUB_SNDHWM = 1000
#: Watchdog: a thread that has not reported progress for this long is stuck (s); the service then
#: HOLDs ``internal_error`` and fails (``serve`` exits non-zero). A registration may take up to
#: ``PAIR_STALL_S``, a command (``load_plan`` builds the processor) up to ``COMMAND_STALL_S``.
THREAD_STALL_S = 2.0
PAIR_STALL_S = 10.0
COMMAND_STALL_S = 120.0
#: ZeroMQ ``MAXMSGSIZE`` beyond the largest legal message part, bytes. A part up to the hard cap is
#: received and refused (HOLD ``oversize_message``, recorded); beyond it ZeroMQ drops the connection,
#: which the socket monitor reports (HOLD ``peer_disconnected``, recorded).
MAXMSGSIZE_SLACK_BYTES = 1 << 20


class Mailbox:
    """A one-slot hand-over between two threads: a new item replaces (drops) an unread one."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item = None
        self.dropped = 0

    def put(self, item) -> Any:
        """Leave ``item``; returns the unread item it replaced (None if none)."""
        with self._cond:
            old, self._item = self._item, item
            if old is not None:
                self.dropped += 1
            self._cond.notify()
            return old

    def get(self, timeout_s: float) -> Any:
        """The item, or None after ``timeout_s``."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
            return item


@dataclass
class ServiceStats:
    """Live figures (read by tests and benchmarks; approximate across threads)."""

    latency_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    heartbeat_late_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    pairs_completed: int = 0
    pairs_processed: int = 0
    pairs_dropped: int = 0
    frames_rejected: int = 0
    commands: int = 0
    commands_rejected: int = 0
    sent: int = 0


def _random_port(address: str) -> str:
    return address[:-2] + ":*" if address.startswith("tcp://") and address.endswith(":0") else address


class Service:
    """The real-time service. ``start()`` binds and runs; ``stop()`` ends it.

    Parameters
    ----------
    config : ServiceConfig
    processor_factory : callable(PlanConfig) -> PairProcessor, optional
        Default :func:`~spineguide.tracking.service.processing.build_processor`.
    record : SessionRecord, optional
        Default: from ``config.record`` (none at all when no path is set).
    seed : int
        Seed of the pattern processor's noise.

    Attributes
    ----------
    endpoints : dict
        The bound addresses (``frames``, ``publish``, ``command``), with real
        ports when the config asked for port 0.
    """

    def __init__(self, config: ServiceConfig, processor_factory: Callable[[PlanConfig], PairProcessor] | None = None,
                 record: SessionRecord | None = None, seed: int = 0, limits: WireLimits = WireLimits()) -> None:
        self.config = config
        self.limits = limits
        #: This service session's id, in every message it sends (docs/PROTOCOL.md, "Sessions and epochs").
        self.session = uuid.uuid4().hex
        if record is None:
            if config.record.path is None:
                log.warning("no [record] path configured: this session is not recorded")
                # Without a path nothing is kept in memory either (a service runs for hours).
                record = SessionRecord(None, keep_in_memory=False)
            else:
                # A record of its own per session: a restart never appends to or overwrites the last one.
                record = SessionRecord.for_session(config.record.path, self.session, time.time(),
                                                   config.record.raw_frames, keep_in_memory=False)
        self.record = record
        factory = processor_factory or (lambda plan: build_processor(plan, seed))
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self.exporter = None
        if config.record.dicom_exports is not None:
            from .exports import SetupExporter

            self.exporter = SetupExporter(lambda: self.engine.plan, config.record.dicom_exports, self.record,
                                          config.record.dicom_archive)
        self.engine = Engine(config, factory, self.record, self._out.put,
                             on_setup_applied=None if self.exporter is None else self.exporter.export,
                             session=self.session)
        self.mailbox = Mailbox()
        self.stats = ServiceStats()
        self.endpoints: dict[str, str] = {}
        self._stop = threading.Event()
        self._ready = threading.Barrier(4, timeout=10.0)
        self._threads: list[threading.Thread] = []
        self._ctx: zmq.Context | None = None
        self._auth: Authenticator | None = None
        self._complete_mono: dict[int, float] = {}
        self._frames_for_record: dict[tuple[int, int], dict[str, str]] = {}
        self._errors: list[str] = []
        self._failure: str | None = None
        self._failure_lock = threading.Lock()
        self._failed = threading.Event()
        self._fail_reported = threading.Event()
        self._running = threading.Event()
        # Watchdog: thread name -> (monotonic time of its last progress, how long it may go without).
        self._progress: dict[str, tuple[float, float]] = {}

    # --------------------------------------------------------------- lifecycle
    def start(self) -> Service:
        """Bind every endpoint and start the threads; returns once all sockets are bound.

        Raises
        ------
        TrackingError
            A socket could not be bound or the keys are unusable.
        """
        try:
            self.config.security.require_choice()
        except TrackingError as err:
            self.record.close()
            raise SecurityError(f"service not started: {err}") from err
        if self.config.security.insecure:
            log.error("%s", INSECURE_WARNING)
        log_config(self.config)
        if any(p.plan.method != "pattern" for p in self.config.catalogue):
            from .processing import warm_up_kernels

            log.info("numba kernels ready in %.2f s (compiled or loaded before the threads start)", warm_up_kernels())
        self._ctx = zmq.Context()
        server_keys = None
        if self.config.security.enabled:
            try:
                self._auth = Authenticator(self._ctx, self.config.security, self._auth_denied)
            except TrackingError:
                self._ctx.destroy(linger=0)
                self._ctx = None
                self.record.close()
                raise
            server_keys = self._auth.server
        self._server_keys = server_keys
        now, mono = time.time(), time.monotonic()
        self.record.write("session", t_unix_s=now, t_mono_s=mono, session=self.session, config=self.config.to_dict(),
                          versions={"pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "numpy": np.__version__})
        if self.config.security.insecure:
            self.record.write("security_warning", t_unix_s=now, t_mono_s=mono, warning=INSECURE_WARNING)
        self.engine.start_session(now, mono)
        for name, target in (("io", self._io_main), ("worker", self._worker_main), ("publisher", self._pub_main)):
            self._beat(name, 30.0)  # until the thread has bound its sockets and started its loop
            t = threading.Thread(target=self._guard(target), name=f"service-{name}", daemon=True)
            self._threads.append(t)
            t.start()
        try:
            self._ready.wait()
        except threading.BrokenBarrierError:
            self.stop()
            raise TrackingError(f"service did not start: {'; '.join(self._errors) or 'timeout'}") from None
        self._running.set()
        return self

    def _auth_denied(self, public_key_z85: str) -> None:
        self.record.write("auth_denied", public_key=public_key_z85)

    def stop(self) -> None:
        """Stop the threads, close the sockets, write ``closed`` and close the record."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10.0)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            if stuck:  # their sockets are still open: terminating the context would hang
                log.error("threads %s did not stop; leaving the ZeroMQ context open", stuck)
            else:
                self._ctx.term()
        if self.exporter is not None:
            self.exporter.join()
        self.record.close()

    def run_forever(self) -> None:
        """Block until interrupted, stopped or failed; raises TrackingError after a failure."""
        try:
            failure = self.run_until(threading.Event())
        finally:
            self.stop()
        if failure is not None:
            raise TrackingError(f"service failed: {failure}")

    def run_until(self, stop: threading.Event, duration_s: float | None = None) -> str | None:
        """Watch the threads until ``stop`` is set, ``duration_s`` passed, or the service failed (main thread).

        Returns the failure (a dead or stuck thread) or None. The caller then
        calls :meth:`stop` and, after a failure, exits non-zero: a service that
        cannot judge frames must not stay up (its heartbeats stop with it, and
        receivers HOLD on heartbeat loss).
        """
        deadline = None if duration_s is None else time.monotonic() + duration_s
        while not stop.is_set() and not self._stop.is_set():
            # The publisher checks at each heartbeat; this covers a dead or stuck publisher.
            self.check_health()
            if self._failed.wait(0.1):
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
        if self._failure is not None:
            # Let the publisher send the HOLD internal_error before the sockets close.
            self._fail_reported.wait(1.0)
            drain_until = time.monotonic() + 0.5
            while not self._out.empty() and time.monotonic() < drain_until:
                time.sleep(0.01)
        return self._failure

    @property
    def failure(self) -> str | None:
        """Why the service failed (a dead or stuck thread), or None while healthy."""
        return self._failure

    def _beat(self, name: str, allowance_s: float = THREAD_STALL_S) -> None:
        """Thread ``name`` made progress now and may go ``allowance_s`` without the next report."""
        self._progress[name] = (time.monotonic(), allowance_s)

    def check_health(self, now_mono_s: float | None = None) -> str | None:
        """Watchdog: fail the service if a thread died or made no progress within its allowance."""
        if self._stop.is_set() or not self._threads:
            return self._failure
        now = time.monotonic() if now_mono_s is None else now_mono_s
        for t in self._threads:
            name = t.name.removeprefix("service-")
            if not t.is_alive() and not self._stop.is_set():
                self._fail(f"thread {name} is dead")
                break
            last, allowance = self._progress.get(name, (now, THREAD_STALL_S))
            if now - last > allowance:
                self._fail(f"thread {name} made no progress for {now - last:.1f} s (allowed {allowance:.1f} s)")
                break
        return self._failure

    def _fail(self, detail: str) -> None:
        """The service cannot go on: HOLD ``internal_error`` (recorded), no ENABLE ever again, stop heartbeats."""
        with self._failure_lock:
            if self._failure is not None:
                return
            self._failure = detail
        log.critical("service failed: %s", detail)
        self._errors.append(detail)
        self._failed.set()  # first: whatever blocks below, the main thread ends the process
        now, mono = time.time(), time.monotonic()
        try:
            if not self.engine.internal_error(f"service failed: {detail}", now, mono, lock_timeout_s=0.2):
                # A thread is stuck inside the engine (the publisher then waits for it too): no HOLD can be
                # decided, but the heartbeats have stopped with the publisher and the process ends, so
                # receivers HOLD on heartbeat loss (PROTOCOL.md).
                self.record.write("error", t_unix_s=now, t_mono_s=mono, outputs=[],
                                  detail=f"service failed: {detail} (engine lock held: no HOLD could be sent; "
                                         "heartbeats stopped)")
        finally:
            self._fail_reported.set()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _guard(self, target: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                target()
            except threading.BrokenBarrierError:
                return  # another thread failed to start; start() reports it
            except Exception as err:  # noqa: BLE001 - report, HOLD, fail, and let stop() clean up
                detail = f"{threading.current_thread().name} died: {type(err).__name__}: {err}"
                log.error("%s\n%s", detail, traceback.format_exc())
                if self._running.is_set():
                    self._fail(detail)
                    return
                self._errors.append(detail)  # failed while starting: start() raises it
                try:
                    self._ready.abort()
                except threading.BrokenBarrierError:
                    pass
                self.engine.internal_error(detail, time.time(), time.monotonic())
        return run

    def _bind(self, sock: zmq.Socket, name: str) -> None:
        make_server_socket_secure(sock, self._server_keys)
        address = _random_port(getattr(self.config.endpoints, name))
        try:
            sock.bind(address)
        except zmq.ZMQError as err:
            raise TrackingError(f"endpoint {name}: cannot bind {address}: {err}") from err
        self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ io
    def _io_main(self) -> None:
        """Owns the frames PULL (and its monitor) and the command ROUTER."""
        pull = self._ctx.socket(zmq.PULL)
        router = self._ctx.socket(zmq.ROUTER)
        monitor = command_monitor = None
        try:
            pull.setsockopt(zmq.LINGER, 0)
            router.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.RCVHWM, 8)  # never a backlog of frames in the socket either
            # MAXMSGSIZE is a hard cap per message part: a part over it makes ZeroMQ drop the connection
            # (and what was queued on it), silently. So the cap sits above every legal part: oversize parts
            # up to it are received and refused here; beyond it, the monitor reports the disconnection.
            largest_part = max(self.limits.max_header_bytes, self.limits.max_payload_bytes)
            pull.setsockopt(zmq.MAXMSGSIZE, largest_part + MAXMSGSIZE_SLACK_BYTES)
            router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_header_bytes + MAXMSGSIZE_SLACK_BYTES)
            monitor = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            command_monitor = router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            self._bind(pull, "frames")
            self._bind(router, "command")
            self._ready.wait()
            poller = zmq.Poller()
            poller.register(pull, zmq.POLLIN)
            poller.register(router, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            poller.register(command_monitor, zmq.POLLIN)
            pairer = FramePairer(self.config.imagers, self.config.safety.pair_timeout_s,
                                 self.config.safety.max_pair_id_jump, allow_partial=self.config.one_view.enabled)
            reply_seq = 0
            tokens, token_mono = float(COMMAND_BURST), time.monotonic()
            while not self._stop.is_set():
                self._beat("io")
                wait_ms = _POLL_MS
                expiry = pairer.next_expiry_mono_s()
                if expiry is not None:
                    wait_ms = max(0, min(_POLL_MS, math.ceil((expiry - time.monotonic()) * 1e3)))
                events = dict(self._poll_io(poller, wait_ms))
                if router in events:
                    for _ in range(64):  # drain a burst of commands, bounded so frames are not starved
                        try:
                            msg = router.recv_multipart(zmq.NOBLOCK, copy=False)  # frames carry the ZAP User-Id
                        except zmq.Again:
                            break
                        now_mono = time.monotonic()
                        tokens = min(COMMAND_BURST, tokens + (now_mono - token_mono) * COMMAND_RATE_PER_S)
                        token_mono = now_mono
                        limited = tokens < 1.0
                        if not limited:
                            tokens -= 1.0
                        self._beat("io", COMMAND_STALL_S)  # load_plan builds the processor on this thread
                        out = self._guarded_command(msg, limited)
                        self._beat("io")
                        if out is not None:
                            envelope, body = out
                            router.send_multipart(envelope + encode_reply(reply_seq, body, session=self.session))
                            reply_seq += 1
                if pull in events:
                    for _ in range(16):
                        try:
                            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)  # frames carry the ZAP User-Id
                        except zmq.Again:
                            break
                        try:
                            if not self._frame_sender_is_imager(frames[0]):
                                continue
                            self._handle_frame([f.bytes for f in frames], pairer)
                        except Exception as err:  # noqa: BLE001 - one bad message must never make the service deaf
                            self._io_refusal("kvframe", err)
                        self._beat("io")  # a burst of large frames is progress, message by message
                if monitor in events:
                    self._handle_monitor(monitor)
                if command_monitor in events:
                    self._handle_command_monitor(command_monitor)
                expired = pairer.expire(time.monotonic())
                if expired:
                    self._dispatch(expired, pairer, time.time(), time.monotonic(), None)
        finally:
            if monitor is not None:
                pull.disable_monitor()
                monitor.close(0)
            if command_monitor is not None:
                router.disable_monitor()
                command_monitor.close(0)
            pull.close(0)
            router.close(0)

    def _poll_io(self, poller: zmq.Poller, wait_ms: int) -> list:
        """The io thread's one wait (a seam for fault-injection tests)."""
        return poller.poll(wait_ms)

    def _guarded_command(self, msg: list, limited: bool):
        try:
            return self._handle_command_message(msg, limited)
        except Exception as err:  # noqa: BLE001 - one bad message must never make the service deaf
            detail = self._io_refusal("command", err)
            if len(msg) < 2:
                return None
            envelope = [bytes(msg[0])] + ([b""] if len(msg) > 2 and bytes(msg[1]) == b"" else [])
            return envelope, {"ok": False, "reason": f"internal error: {detail}", "command": None,
                              "state": self.engine.state.value}

    def _io_refusal(self, what: str, err: Exception) -> str:
        """An unexpected exception while handling one inbound message: HOLD ``internal_error``, record, go on."""
        detail = f"io: {type(err).__name__} while handling a {what} message: {err}"
        log.error("%s\n%s", detail, traceback.format_exc())
        self.stats.frames_rejected += what == "kvframe"
        self.stats.commands_rejected += what == "command"
        self.engine.frame_fault(HoldReason.INTERNAL_ERROR, detail, time.time(), time.monotonic(), None,
                                alive=False)
        return detail

    def _handle_monitor(self, monitor: zmq.Socket) -> None:
        """A frames peer disconnected (closed, killed, or over MAXMSGSIZE): HOLD and record it."""
        for endpoint in _disconnected_endpoints(monitor):
            self.engine.frame_fault(
                HoldReason.PEER_DISCONNECTED,
                f"a frames peer on {endpoint} disconnected (closed or killed, or it sent a message part over the "
                f"{max(self.limits.max_header_bytes, self.limits.max_payload_bytes) + MAXMSGSIZE_SLACK_BYTES}-byte "
                "hard cap, which ZeroMQ drops with the connection)", time.time(), time.monotonic(), None,
                alive=False)

    def _handle_command_monitor(self, monitor: zmq.Socket) -> None:
        """A command client disconnected: recorded (no HOLD: consoles come and go), so that a request over the
        ``MAXMSGSIZE`` hard cap, which ZeroMQ drops with the connection, never vanishes without a trace."""
        for endpoint in _disconnected_endpoints(monitor):
            cap = self.limits.max_header_bytes + MAXMSGSIZE_SLACK_BYTES
            self.record.write("command_peer_disconnected", endpoint=endpoint,
                              detail=f"a command client disconnected (closed, or it sent a request over the "
                                     f"{cap}-byte hard cap, which ZeroMQ drops with the connection)")

    def _frame_sender_is_imager(self, first: zmq.Frame) -> bool:
        """Under CURVE only a key with the ``imager`` role may send frames; any other is refused (HOLD, recorded).

        Without CURVE (``[security] enabled = false``) nobody is authenticated and every sender is taken.
        """
        if self._auth is None:
            return True
        identity = self._auth.identity_of(user_id_of(first))
        if identity is not None and identity.role is Role.IMAGER:
            return True
        self.stats.frames_rejected += 1
        who = "an unknown key" if identity is None else f"client '{identity.name}' (role {identity.role.value})"
        self.engine.frame_fault(HoldReason.FRAME_SENDER_NOT_IMAGER,
                                f"kvframe from {who}: only a key with the imager role may send frames",
                                time.time(), time.monotonic(), None)
        return False

    def _handle_frame(self, parts: list[bytes], pairer: FramePairer) -> None:
        now, mono = time.time(), time.monotonic()
        oversize = self._oversize(parts)
        if oversize is not None:
            self.stats.frames_rejected += 1
            self.engine.frame_fault(HoldReason.OVERSIZE_MESSAGE, oversize, now, mono, None)
            return
        try:
            wf = decode_kvframe(parts, self.limits)
        except (WireSchemaError, FrameError) as err:
            self.stats.frames_rejected += 1
            reason = HoldReason.NAN_FRAME if isinstance(err, NonFinitePixelsError) else HoldReason.CORRUPT_FRAME
            pair_id = None
            if isinstance(err, (PayloadSizeError, NonFinitePixelsError)):
                pair_id = _pair_id_from_header(parts, self.limits)
            self.engine.frame_fault(reason, str(err), now, mono, pair_id)
            return
        self._dispatch(pairer.offer(wf.frame, wf.seq, wf.session, mono), pairer, now, mono, wf.session)

    def _dispatch(self, events: list, pairer: FramePairer, now: float, mono: float, session: str | None) -> None:
        """Act on the pairer's events (from a frame, or from :meth:`FramePairer.expire`), in order."""
        for event in events:
            if isinstance(event, NewEpoch):
                self.engine.new_epoch(event.reason, event.detail, now, mono, event.pair_id)
            elif isinstance(event, FrameAccepted):
                f = event.frame
                raw = self.record.save_frame(f.pair_id, f.imager, f.pixels, event.epoch)
                self.engine.frame_arrived(f.imager, f.pair_id, event.seq, f.acquired_unix_s, now, mono, raw, f.i0,
                                          session)
                if raw is not None:
                    self._frames_for_record.setdefault((event.epoch, f.pair_id), {})[f.imager] = raw
            elif isinstance(event, ViewReturned):
                log.info("pair %d: %s", event.pair_id, event.detail)
            elif isinstance(event, PairFault):
                if event.reason is not HoldReason.UNPAIRED_FRAME:
                    self.stats.frames_rejected += 1
                self._frames_for_record.pop((pairer.epoch, event.pair_id), None)
                self.engine.frame_fault(event.reason, event.detail, now, mono, event.pair_id)
            elif isinstance(event, CompletePair):
                self.stats.pairs_completed += 1
                self._complete_mono[event.pair_id] = event.complete_mono_s
                old = self.mailbox.put((event.pair_id, event.frames, event.complete_mono_s, event.epoch))
                if old is not None:
                    self.stats.pairs_dropped += 1
                    old_pid, _, old_mono, old_epoch = old
                    self._frames_for_record.pop((old_epoch, old_pid), None)
                    self._complete_mono.pop(old_pid, None)
                    self.engine.frame_fault(
                        HoldReason.PAIR_DROPPED, f"pair {old_pid} was not processed: pair {event.pair_id} completed "
                        f"{(event.complete_mono_s - old_mono) * 1e3:.0f} ms after it, before the worker was free",
                        now, mono, old_pid)

    def _oversize(self, parts: list) -> str | None:
        """Why an inbound ``kvframe`` is too large to decode at all, or None."""
        lim = self.limits
        if not isinstance(parts, list) or len(parts) > 3:
            return None  # the decoder names the frame-count problem
        sizes = [len(p) for p in parts]
        if len(sizes) > 1 and sizes[1] > lim.max_header_bytes:
            return f"kvframe: header part is {sizes[1]} bytes (limit {lim.max_header_bytes})"
        if len(sizes) > 2 and sizes[2] > lim.max_payload_bytes:
            return f"kvframe: pixel part is {sizes[2]} bytes (limit {lim.max_payload_bytes})"
        return None

    def _handle_command_message(self, frames: list[zmq.Frame], limited: bool):
        # The operator is the client key that authenticated this connection (ZAP User-Id), never a
        # name the client writes into the command (security.authorize_command).
        identity = None if self._auth is None else self._auth.identity_of(user_id_of(frames[-1]))
        msg = [f.bytes for f in frames]
        # ROUTER envelope: [identity, (b"" for REQ clients), frames...]
        if len(msg) < 2:
            return None
        envelope = [msg[0]]
        rest = msg[1:]
        if rest and rest[0] == b"":
            envelope.append(b"")
            rest = rest[1:]
        now, mono = time.time(), time.monotonic()
        self.stats.commands += 1
        if limited:
            self.stats.commands_rejected += 1
            body = {"ok": False, "reason": f"rate limited: more than {COMMAND_RATE_PER_S:g} commands/s",
                    "command": None, "state": self.engine.state.value}
            self.record.write("command_rejected", t_unix_s=now, t_mono_s=mono, reason=body["reason"])
            return envelope, body
        try:
            req = decode_command(rest, self.limits)
        except WireSchemaError as err:
            self.stats.commands_rejected += 1
            body = {"ok": False, "reason": f"malformed command: {err}", "command": None,
                    "state": self.engine.state.value}
            self.record.write("command_rejected", t_unix_s=now, t_mono_s=mono, reason=body["reason"])
            return envelope, body
        try:
            params = authorize_command(identity, self.config.security.insecure, req.command, req.params)
        except CommandRefused as err:
            self.stats.commands_rejected += 1
            body = {"ok": False, "reason": str(err), "command": req.command, "state": self.engine.state.value}
            self.record.write("command_rejected", t_unix_s=now, t_mono_s=mono, reason=body["reason"],
                              command=req.command, operator=None if identity is None else identity.name,
                              role=None if identity is None else identity.role.value)
            log.warning("command refused: %s", err)
            return envelope, body
        reply, _ = self.engine.handle_command(req.command, params, now, mono, req.seq, req.session)
        return envelope, reply

    # ------------------------------------------------------------------ worker
    def _worker_main(self) -> None:
        """Owns no socket: registration and judgement of pairs."""
        self._ready.wait()
        while not self._stop.is_set():
            self._beat("worker")
            item = self.mailbox.get(0.05)
            if item is None:
                continue
            pair_id, frames, complete_mono, epoch = item
            self._beat("worker", PAIR_STALL_S)
            acquired = min(f.acquired_unix_s for f in frames.values())
            job, processor = self.engine.begin_pair(pair_id, acquired, complete_mono, time.time(), epoch)
            result = run_processor(processor, frames, job, self.config)
            raw = self._frames_for_record.pop((epoch, pair_id), None)
            self.engine.finish_pair(job, result, time.time(), time.monotonic(), raw)
            self.stats.pairs_processed += 1

    # --------------------------------------------------------------- publisher
    def _pub_main(self) -> None:
        """Owns the PUB socket: numbers and sends every message; heartbeats and the gating timer."""
        pub = self._ctx.socket(zmq.PUB)
        try:
            pub.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
            self._bind(pub, "publish")
            self._ready.wait()
            period = self.config.safety.heartbeat_period_s
            seq = 0
            next_beat = time.monotonic()
            handled_deadline = None
            while not self._stop.is_set():
                self._beat("publisher")
                try:  # outgoing messages first: they are never delayed by the timers
                    seq = self._send(pub, seq, self._out.get_nowait())
                    continue
                except queue.Empty:
                    pass
                deadline_unix = self.engine.next_deadline_unix_s()
                if deadline_unix == handled_deadline:
                    deadline_unix = None  # already judged; the heartbeat tick repeats the check
                wait = next_beat - time.monotonic()
                if deadline_unix is not None:
                    wait = min(wait, deadline_unix - time.time())
                if wait > 0:
                    try:
                        seq = self._send(pub, seq, self._out.get(timeout=min(wait, 0.1)))
                        continue
                    except queue.Empty:
                        pass
                now, mono = time.time(), time.monotonic()
                if deadline_unix is not None and now >= deadline_unix:
                    self.engine.tick(now, mono)
                    handled_deadline = deadline_unix
                if mono >= next_beat:
                    late_ms = (mono - next_beat) * 1e3
                    self.stats.heartbeat_late_ms.append(late_ms)
                    # Watchdog: a dead or stuck thread fails the service (HOLD internal_error first).
                    if self.check_health(mono) is None:
                        extra = {"phase": None if self.engine.phase is None else self.engine.phase.value}
                        seq = self._send_parts(pub, seq, encode_heartbeat(seq, now, self.engine.state.value, extra,
                                                                          session=self.session),
                                               {"topic": "heartbeat", "late_ms": late_ms})
                    # else: no heartbeats from a failed service; receivers HOLD on heartbeat loss.
                    self.engine.tick(now, mono)
                    next_beat += period
                    if next_beat < mono:  # fell far behind (suspended): restart the clock, never burst
                        next_beat = mono + period
        finally:
            pub.close(0)

    def _send(self, pub: zmq.Socket, seq: int, body: dict) -> int:
        if self._failure is not None and body.get("beam") == Beam.ENABLE.value:
            log.error("service failed: not sending ENABLE for pair %s", body.get("pair_id"))
            self.record.write("not_sent", reason=f"service failed: {self._failure}", body=body)
            return seq
        try:
            parts = encode_message(seq, body)
        except WireSchemaError as err:
            log.error("refusing to send %s: %s", body.get("schema"), err)
            self.engine.internal_error(f"unsendable {body.get('schema')}: {err}", time.time(), time.monotonic())
            return seq
        meta: dict[str, Any] = {"topic": parts[0].decode()}
        pid = body.get("pair_id")
        if meta["topic"] == "gating" and pid is not None:
            complete = self._complete_mono.pop(pid, None)
            if complete is not None:
                meta["latency_ms"] = (time.monotonic() - complete) * 1e3
                self.stats.latency_ms.append(meta["latency_ms"])
            now_mono = time.monotonic()
            for old, t in list(self._complete_mono.items()):
                if now_mono - t > 5.0:  # never judged (dropped or faulted); pair ids may restart in a new epoch
                    self._complete_mono.pop(old, None)
        return self._send_parts(pub, seq, parts, meta, body)

    def _send_parts(self, pub: zmq.Socket, seq: int, parts: list[bytes], meta: dict, body: dict | None = None) -> int:
        try:
            pub.send_multipart(parts, zmq.NOBLOCK)
        except zmq.Again:
            meta["dropped"] = True
        self.stats.sent += 1
        self.record.write("sent", seq=seq, **meta, body=body)
        return seq + 1


def _disconnected_endpoints(monitor: zmq.Socket):
    """The endpoints of the events waiting on a socket monitor (each a disconnection), without blocking."""
    from zmq.utils.monitor import recv_monitor_message

    while monitor.poll(0):
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        endpoint = event.get("endpoint", b"")
        yield endpoint.decode("ascii", "replace") if isinstance(endpoint, bytes) else str(endpoint)


def _pair_id_from_header(parts: list[bytes], limits: WireLimits) -> int | None:
    """Best-effort pair id of a frame whose header decoded but whose pixels did not (for the HOLD); None if none."""
    from spineguide.calibration.jsonfile import parse_json_bytes

    try:
        header = parse_json_bytes(bytes(parts[1]), "kvframe header", WireSchemaError,
                                  max_bytes=limits.max_header_bytes, max_depth=limits.max_json_depth)
    except WireSchemaError:
        return None
    pid = header.get("pair_id") if isinstance(header, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid >= 0 else None


# ------------------------------------------------------------------- replay
@dataclass
class ReplayReport:
    """Outcome of :func:`replay_session`."""

    events: int = 0
    pairs: int = 0
    recomputed_pairs: int = 0
    differences: list[str] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences


#: Replayed floats must agree to this (JSON round trip of poses re-derives corrections), mm / deg / s.
REPLAY_ATOL = 1e-9


#: Reply fields added after sessions were first recorded: absent from an older record's replies.
_ADDED_REPLY_KEYS = frozenset({"plan"})


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a and k in _ADDED_REPLY_KEYS and where.endswith(" reply"):
                continue  # recorded before the service answered it (docs/PROTOCOL.md): not a difference
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'recorded' if k in a else 'replayed'}")
            else:
                _diff(a[k], b[k], f"{where}.{k}", out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} recorded items, {len(b)} replayed")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{where}[{i}]", out)
    elif isinstance(a, float) or isinstance(b, float):
        if not (isinstance(a, (int, float)) and isinstance(b, (int, float))) or abs(a - b) > REPLAY_ATOL:
            out.append(f"{where}: recorded {a!r}, replayed {b!r}")
    elif a != b:
        out.append(f"{where}: recorded {a!r}, replayed {b!r}")


def _jsonify(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def replay_session(path: str | Path, processor_factory: Callable[[PlanConfig], PairProcessor] | None = None,
                   recompute: bool = True, seed: int = 0) -> ReplayReport:
    """Re-run a recorded session through a fresh engine with the recorded clock values.

    Every command, frame arrival, fault, pair and timer decision is fed in
    record order; the replies and outgoing messages are compared with the
    recorded ones. Where raw frames were kept and ``recompute`` is set, the
    registration itself is re-run on them and its result compared too.

    Raises
    ------
    RecordError
        Unreadable record; TrackingError if it has no ``session`` header.
    """
    from ..frames import KvFrame as _Frame
    from .record import RecordError

    p = Path(path)
    records = read_record(p)
    if not records or records[0]["event"] != "session":
        raise RecordError(f"{p}: not a session record (first event is not 'session')")
    recorded = records[0]["config"]
    if isinstance(recorded, dict) and isinstance(recorded.get("security", {}), dict):
        security = recorded.get("security", {})
        if security.get("enabled") is None and security.get("server_secret_key") is None:
            # Recorded before CURVE became the default (a session without keys ran plain TCP). Replay opens
            # no socket, so this only restores what that session was; it never turns security off anywhere.
            recorded = {**recorded, "security": {**security, "enabled": False}}
    config = config_from_dict(recorded, f"{p} (session header)")
    factory = processor_factory or (lambda plan: build_processor(plan, seed))
    mem = SessionRecord(None)
    engine = Engine(config, factory, mem, lambda body: None, session=records[0].get("session"))
    report = ReplayReport()
    folder = frames_folder(p.resolve())  # the record's own frames, also when ``path`` is the "newest" link
    i0s: dict[tuple[int, str], float | None] = {}
    for i, rec in enumerate(records[1:], start=2):
        ev = rec["event"]
        t, mono = rec["t_unix_s"], rec["t_mono_s"]
        where = f"line {i} ({ev})"
        diffs: list[str] = []
        if ev == "start":
            engine.start_session(t, mono)
            report.events += 1
            continue
        if ev == "command":
            reply, outputs = engine.handle_command(rec["command"], rec["params"], t, mono,
                                                   rec["reply"].get("request_seq"))
            _diff(rec["reply"], _jsonify(reply), f"{where} reply", diffs)
            _diff(rec["outputs"], _jsonify(outputs), f"{where} outputs", diffs)
        elif ev == "frame":
            i0s[(rec["pair_id"], rec["imager"])] = rec.get("i0")
            engine.frame_arrived(rec["imager"], rec["pair_id"], rec["seq"], rec["acquired_unix_s"], t, mono,
                                 rec.get("raw_file"), rec.get("i0"))
        elif ev == "frame_fault":
            outputs = engine.frame_fault(HoldReason(rec["reason"]), rec["detail"], t, mono, rec["pair_id"],
                                         rec.get("alive", True))
            _diff(rec["outputs"], _jsonify(outputs), f"{where} outputs", diffs)
        elif ev == "tick":
            _diff(rec["outputs"], _jsonify(engine.tick(t, mono)), f"{where} outputs", diffs)
        elif ev == "epoch":
            engine.new_epoch(HoldReason(rec["reason"]), rec["detail"], t, mono, rec["pair_id"])
            _diff(rec["epoch"], engine.epoch, f"{where} epoch", diffs)
        elif ev == "error":
            engine.internal_error(rec["detail"], t, mono)
        elif ev == "pair":
            report.pairs += 1
            job, processor = engine.begin_pair(rec["pair_id"], rec["acquired_unix_s"], rec["complete_mono_s"],
                                               rec["begin_unix_s"], rec.get("epoch", 0))
            _diff(rec["skip"], None if job.skip is None else job.skip.value, f"{where} skip", diffs)
            recorded = PairResult.from_json(rec["result"])
            result = recorded
            raw = rec.get("raw_files")
            if recompute and raw and job.skip is None and processor is not None:
                try:
                    frames = {}
                    for name, file in raw.items():
                        frames[name] = _Frame(name, np.load(folder / file, allow_pickle=False),
                                              i0=i0s.get((rec["pair_id"], name)),
                                              acquired_unix_s=rec["acquired_unix_s"], pair_id=rec["pair_id"])
                except (OSError, ValueError) as err:
                    diffs.append(f"{where}: raw frames unreadable: {err}")
                else:
                    result = run_processor(processor, frames, job, config)
                    report.recomputed_pairs += 1
                    a, b = rec["result"], _jsonify(result.to_json())
                    for d in (a, b):
                        d.get("quality", {}).pop("elapsed_ms", None)
                    _diff(a, b, f"{where} result", diffs)
            outputs = engine.finish_pair(job, result, t, mono, raw)
            rec_out = _jsonify(rec["outputs"])
            new_out = _jsonify(outputs)
            for lst in (rec_out, new_out):
                for o in lst:
                    o.get("quality", {}).pop("elapsed_ms", None)
            _diff(rec_out, new_out, f"{where} outputs", diffs)
        else:
            continue
        report.events += 1
        report.differences.extend(diffs)
    return report
