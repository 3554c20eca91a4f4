//! The write side of one client connection.
//!
//! Fan-out writes go straight to the socket: [`ConnWriter::send`] tries a
//! non-blocking `write` of the shared frame bytes from the caller's task
//! (usually the channel's dispatcher). Only when the kernel's send buffer is
//! full does the frame go into the connection's bounded queue, and only then
//! is a drain task spawned, which writes the queue as the socket becomes
//! writable and ends once it is empty. In the common case a delivery
//! therefore costs one syscall and no task wake-up, and an idle connection
//! has no writer task at all (a task's future is held for its whole life).
//! With a write window, each window's first frame starts the drain task,
//! which writes the window's frames together when it ends.
//!
//! When the queue reaches its bound the client is a slow consumer: the queue
//! is dropped, a close frame with the reason is attempted and the connection
//! is shut down. The channel never waits for one socket.
//!
//! The socket is behind [`SocketWrite`], so the same writer serves a TCP
//! socket in production and an in-memory pipe in unit tests.

use bytes::Bytes;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

use crate::frame::{self, CloseReason};

/// The write half of a client socket as [`ConnWriter`] uses it: writes that
/// never wait, from whichever task delivers, and a wait for room.
pub trait SocketWrite: Send + Sync + 'static {
    /// Writes what the socket takes now; `WouldBlock` when it takes nothing.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Ready when the socket may take more bytes.
    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Half-closes the socket after the close frame.
    fn shutdown_write(&self);
}

impl SocketWrite for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match bufs {
            [one] => self.as_ref().try_write(one),
            _ => self.as_ref().try_write_vectored(bufs),
        }
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.as_ref().poll_write_ready(cx)
    }

    fn shutdown_write(&self) {
        // Half-close: the client sees EOF after the close frame, while its
        // own close frame can still be read.
        let _ = socket2::SockRef::from(self.as_ref()).shutdown(std::net::Shutdown::Write);
    }
}

/// Why a frame was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("connection is closed")]
    Closed,
    #[error("slow consumer: outbound queue full")]
    SlowConsumer,
}

#[derive(Debug, Default)]
struct State {
    queue: VecDeque<Bytes>,
    /// Bytes of `queue[0]` already written.
    offset: usize,
    close: Option<CloseReason>,
    /// Set on a write error: nothing more can be written.
    broken: bool,
    /// With a write window: when the queued frames are due.
    due: Option<tokio::time::Instant>,
    /// A drain task is running (it alone writes while the queue is not
    /// empty).
    draining: bool,
    /// The close frame went out (or could not), and the write side is shut.
    finished: bool,
}

impl State {
    /// Drops every queued frame except one the socket already took part
    /// of: cutting a frame short would corrupt the stream, and the close
    /// frame that follows would not reach the client as a close frame.
    fn drop_queued(&mut self) {
        let partial = if self.offset > 0 { self.queue.pop_front() } else { None };
        self.queue.clear();
        self.queue.extend(partial);
    }
}

/// The shared write half of a connection.
pub struct ConnWriter {
    stream: Box<dyn SocketWrite>,
    state: Mutex<State>,
    /// Woken when the write side has finished ([`Self::finished`]).
    notify: Notify,
    /// Where drain tasks are spawned (the edge's tracker, so shutdown waits
    /// for them).
    tasks: TaskTracker,
    max_queue: usize,
    /// The write window (zero: none).
    delay: std::time::Duration,
    /// Set when the connection must end (slow consumer, write error, close
    /// requested); the read side waits for it ([`Self::done`]). A flag and
    /// a `Notify` in the writer, not a `CancellationToken`: the token is an
    /// allocation of its own (112 B), on every connection.
    done: AtomicBool,
    done_notify: Notify,
}

impl std::fmt::Debug for ConnWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnWriter")
            .field("max_queue", &self.max_queue)
            .field("state", &*self.lock())
            .finish_non_exhaustive()
    }
}

/// A connection's drain task ([`ConnWriter::drain_until_empty`]).
pub(crate) async fn drain_task(writer: Arc<ConnWriter>) {
    writer.drain_until_empty().await;
}

impl ConnWriter {
    /// A writer for `stream` that queues at most `max_queue` frames and
    /// spawns its drain tasks on `tasks`.
    pub fn new(stream: Box<dyn SocketWrite>, max_queue: usize, tasks: TaskTracker) -> Self {
        Self {
            stream,
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            tasks,
            max_queue: max_queue.max(1),
            delay: std::time::Duration::ZERO,
            done: AtomicBool::new(false),
            done_notify: Notify::new(),
        }
    }

    /// With a write window: frames sent within `delay` of the first one
    /// queued leave together, in one vectored write, when it ends. Fewer
    /// writes for a connection that gets many small frames (cursor moves),
    /// at up to `delay` more latency.
    pub fn with_delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Returns once the connection is ending.
    pub async fn done(&self) {
        loop {
            // Created before the check: `notify_waiters` wakes it even if
            // it has not been polled yet.
            let notified = self.done_notify.notified();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }

    /// Whether the connection is ending.
    pub fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    /// Marks the connection as ending and wakes whoever waits in
    /// [`Self::done`].
    fn set_done(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.done_notify.notify_waiters();
        }
    }

    /// The close reason, once decided.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the queue half-updated
        // in a way that matters more than the panic itself; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one encoded frame: written now if the socket takes it, queued
    /// otherwise. Never waits.
    pub fn send(self: &Arc<Self>, frame: Bytes) -> Result<(), SendError> {
        self.send_many(std::slice::from_ref(&frame))
    }

    /// Sends several frames in order, with one vectored write when the
    /// queue is empty. The fan-out uses this when events pile up, so a busy
    /// channel pays one syscall per member per batch, not per event.
    pub fn send_many(self: &Arc<Self>, frames: &[Bytes]) -> Result<(), SendError> {
        let mut st = self.lock();
        if st.close.is_some() || st.broken {
            return Err(SendError::Closed);
        }
        let mut rest = frames;
        let mut wake = false;
        if !self.delay.is_zero() && st.queue.is_empty() {
            // The first frame of a window: the drain task writes them all
            // when it ends.
            st.due = Some(tokio::time::Instant::now() + self.delay);
            wake = true;
        } else if st.queue.is_empty() {
            match write_some(&*self.stream, rest, 0) {
                Ok(mut n) => {
                    while let Some((first, tail)) = rest.split_first() {
                        if n < first.len() {
                            break;
                        }
                        n -= first.len();
                        rest = tail;
                    }
                    if rest.is_empty() {
                        return Ok(());
                    }
                    st.offset = n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    st.broken = true;
                    drop(st);
                    self.set_done();
                    return Err(SendError::Closed);
                }
            }
            wake = true;
        }
        st.queue.extend(rest.iter().cloned());
        if st.queue.len() > self.max_queue {
            st.drop_queued();
            st.close = Some(CloseReason::new(
                frame::close_code::POLICY,
                format!("slow consumer: more than {} frames queued", self.max_queue),
                "server",
            ));
            let start = self.claim_drain(&mut st);
            drop(st);
            metrics::counter!("fanout_slow_consumer_disconnects_total").increment(1);
            self.set_done();
            self.start_drain(start);
            return Err(SendError::SlowConsumer);
        }
        let start = wake && self.claim_drain(&mut st);
        drop(st);
        self.start_drain(start);
        Ok(())
    }

    /// Whether the caller must start a drain task (none is running); marks
    /// one as running if so.
    fn claim_drain(&self, st: &mut State) -> bool {
        !std::mem::replace(&mut st.draining, true)
    }

    /// Spawns the drain task when `start` (from [`Self::claim_drain`]).
    fn start_drain(self: &Arc<Self>, start: bool) {
        if start {
            self.tasks.spawn(drain_task(self.clone()));
        }
    }

    /// Ends the connection with a close frame. With `abort`, queued frames
    /// are dropped; otherwise they are written first. The first reason wins.
    /// [`Self::finished`] tells when the close frame went out.
    pub fn close(self: &Arc<Self>, reason: CloseReason, abort: bool) {
        let mut st = self.lock();
        if st.close.is_none() {
            if abort {
                st.drop_queued();
            }
            st.close = Some(reason);
        }
        let start = self.claim_drain(&mut st);
        drop(st);
        self.set_done();
        self.start_drain(start);
    }

    /// Waits until the write side has finished: the close frame written
    /// after every queued frame (or the socket broken), the write half shut.
    pub async fn finished(&self) {
        loop {
            let notified = self.notify.notified();
            if self.lock().finished {
                return;
            }
            notified.await;
        }
    }

    /// The drain task: writes the queue whenever the socket is writable
    /// until it is empty, and at the end of the connection writes the close
    /// frame. Returns when the queue is empty (a later send that finds the
    /// socket full starts a new task) or the write side has finished.
    pub async fn drain_until_empty(&self) {
        loop {
            match self.drain() {
                Drained::Empty => return,
                Drained::Due(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        // A close does not wait for the window.
                        () = self.done() => {}
                    }
                    self.lock().due = None;
                }
                Drained::Blocked => {
                    if std::future::poll_fn(|cx| self.stream.poll_writable(cx)).await.is_err() {
                        self.lock().broken = true;
                        break;
                    }
                }
                Drained::Finished => break,
            }
        }
        self.finish().await;
        self.lock().finished = true;
        self.notify.notify_waiters();
    }

    /// Writes queued frames until the queue is empty or the socket is full.
    /// An empty queue with no close to write ends this drain task (under
    /// the lock, so a sender that queues next starts the next one).
    fn drain(&self) -> Drained {
        let mut st = self.lock();
        loop {
            if st.broken {
                return Drained::Finished;
            }
            if st.queue.is_empty() {
                return if st.close.is_some() {
                    Drained::Finished
                } else {
                    st.draining = false;
                    Drained::Empty
                };
            }
            if let Some(at) = st.due
                && st.close.is_none()
                && tokio::time::Instant::now() < at
            {
                return Drained::Due(at);
            }
            st.due = None;
            let batch: Vec<Bytes> = st.queue.iter().take(MAX_IOVECS).cloned().collect();
            match write_some(&*self.stream, &batch, st.offset) {
                Ok(mut n) => {
                    n += st.offset;
                    st.offset = 0;
                    while let Some(front) = st.queue.front() {
                        if n < front.len() {
                            st.offset = n;
                            break;
                        }
                        n -= front.len();
                        st.queue.pop_front();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Drained::Blocked,
                Err(_) => {
                    st.broken = true;
                    return Drained::Finished;
                }
            }
        }
    }

    /// Sends the close frame (best effort, bounded in time) and shuts down
    /// the write side.
    async fn finish(&self) {
        self.set_done();
        let (close, broken) = {
            let st = self.lock();
            (st.close.clone(), st.broken)
        };
        if broken {
            return;
        }
        if let Some(close) = close {
            let bytes = close.frame();
            let write = async {
                let mut written = 0;
                while written < bytes.len() {
                    std::future::poll_fn(|cx| self.stream.poll_writable(cx)).await?;
                    match self.stream.try_write_vectored(&[IoSlice::new(&bytes[written..])]) {
                        Ok(n) => written += n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                io::Result::Ok(())
            };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
        }
        self.stream.shutdown_write();
    }
}

/// Frames per vectored write (well under IOV_MAX).
const MAX_IOVECS: usize = 64;

/// One non-blocking (vectored) write of `frames`, skipping `offset` bytes of
/// the first. Returns the bytes written, counted from `offset`.
fn write_some(stream: &dyn SocketWrite, frames: &[Bytes], offset: usize) -> io::Result<usize> {
    match frames {
        [] => Ok(0),
        // The common case, one frame, needs no slice vector.
        [one] => stream.try_write_vectored(&[IoSlice::new(&one[offset..])]),
        _ => {
            let slices: Vec<IoSlice<'_>> = frames
                .iter()
                .take(MAX_IOVECS)
                .enumerate()
                .map(|(i, f)| IoSlice::new(if i == 0 { &f[offset..] } else { &f[..] }))
                .collect();
            stream.try_write_vectored(&slices)
        }
    }
}

enum Drained {
    Empty,
    /// Frames wait for the end of the write window.
    Due(tokio::time::Instant),
    Blocked,
    Finished,
}

/// Any `AsyncWrite` (one end of `tokio::io::duplex`, say) as a
/// [`SocketWrite`], so unit tests drive connections in memory.
#[cfg(test)]
pub(crate) struct MemorySocket<W>(Mutex<W>);

#[cfg(test)]
impl<W> MemorySocket<W> {
    pub(crate) fn new(w: W) -> Self {
        Self(Mutex::new(w))
    }
}

#[cfg(test)]
impl<W: tokio::io::AsyncWrite + Unpin + Send + 'static> SocketWrite for MemorySocket<W> {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // Polled with a waker that does nothing: a pending write is simply
        // "would block", and the writer task waits in `poll_writable`.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match std::pin::Pin::new(&mut *w).poll_write_vectored(&mut cx, bufs) {
            Poll::Ready(r) => r,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn poll_writable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // An empty write is ready exactly when a duplex pipe has room, and
        // registers the waker when it is full.
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::pin::Pin::new(&mut *w).poll_write(cx, &[]).map_ok(|_| ())
    }

    fn shutdown_write(&self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut w = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let _ = std::pin::Pin::new(&mut *w).poll_shutdown(&mut cx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;

    fn frame(n: u8) -> Bytes {
        frame::encode(frame::Opcode::Text, &[b'a' + n])
    }

    #[tokio::test]
    async fn a_write_window_sends_the_frames_queued_within_it_together_at_its_end() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let window = Duration::from_millis(150);
        let tasks = TaskTracker::new();
        let writer =
            Arc::new(ConnWriter::new(Box::new(MemorySocket::new(ours)), 100, tasks.clone()).with_delay(window));
        let start = Instant::now();
        for n in 0..3 {
            writer.send(frame(n)).unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut buf = [0u8; 64];
        let n = theirs.read(&mut buf).await.unwrap();
        let waited = start.elapsed();
        assert!(
            waited >= window - Duration::from_millis(10),
            "written after {waited:?}, before the window ended"
        );
        assert_eq!(
            &buf[..n],
            [frame(0), frame(1), frame(2)].concat(),
            "all three in one go"
        );
        // The next frame opens a new window.
        writer.send(frame(3)).unwrap();
        let t = Instant::now();
        let n = theirs.read(&mut buf).await.unwrap();
        assert!(t.elapsed() >= window - Duration::from_millis(10));
        assert_eq!(&buf[..n], &frame(3)[..]);
        // A close does not wait for the window: queued frames, then the close.
        writer.send(frame(4)).unwrap();
        writer.close(CloseReason::quiet("server"), false);
        writer.finished().await;
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(&rest[..frame(4).len()], &frame(4)[..]);
        assert_eq!(rest[frame(4).len()], 0x88, "then the close frame");
    }

    #[tokio::test]
    async fn without_a_window_a_frame_is_written_at_once() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let tasks = TaskTracker::new();
        let writer = Arc::new(ConnWriter::new(Box::new(MemorySocket::new(ours)), 100, tasks.clone()));
        writer.send(frame(0)).unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_millis(50), theirs.read(&mut buf))
            .await
            .expect("written by send itself, no task needed")
            .unwrap();
        assert_eq!(&buf[..n], &frame(0)[..]);
        assert_eq!(tasks.len(), 0, "no drain task was started");
    }

    #[tokio::test]
    async fn a_full_socket_starts_a_drain_task_that_ends_once_the_queue_is_written() {
        // A pipe that holds 64 bytes: the first frames fill it, the rest queue.
        let (ours, mut theirs) = tokio::io::duplex(64);
        let tasks = TaskTracker::new();
        let writer = Arc::new(ConnWriter::new(Box::new(MemorySocket::new(ours)), 1000, tasks.clone()));
        let big = |n: u8| frame::encode(frame::Opcode::Text, &[b'a' + n; 30]);
        for n in 0..10 {
            writer.send(big(n)).unwrap();
        }
        assert_eq!(tasks.len(), 1, "one drain task for the queued frames");
        let expected: Vec<u8> = (0..10).flat_map(|n| big(n).to_vec()).collect();
        let mut got = vec![0u8; expected.len()];
        tokio::time::timeout(Duration::from_secs(5), theirs.read_exact(&mut got))
            .await
            .expect("the drain task writes the queue as the pipe empties")
            .unwrap();
        assert_eq!(got, expected, "every frame, in order");
        for _ in 0..500 {
            if tasks.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(tasks.len(), 0, "the drain task ended with the queue empty");
        // The socket has room again: the next frame is written by send.
        writer.send(frame(0)).unwrap();
        assert_eq!(tasks.len(), 0);
        let mut buf = [0u8; 16];
        let n = theirs.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &frame(0)[..]);
        // A close starts a task that writes the close frame and finishes.
        writer.close(CloseReason::quiet("server"), false);
        tokio::time::timeout(Duration::from_secs(5), writer.finished())
            .await
            .expect("finished after the close");
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest[0], 0x88, "the close frame, then EOF");
    }
}
