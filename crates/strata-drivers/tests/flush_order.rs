//! A flush skips a protocol node with no write completed since its last
//! flush (QEMU's flushed_gen). The interleaving that could lose a write:
//! a write still in flight when a flush starts. That flush need not cover
//! it, but the next one must, so the write counts when it completes, not
//! when it starts. A protocol driver whose writes wait at a gate holds the
//! write in flight while a flush runs.

use async_trait::async_trait;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use strata_block::options::Opts;
use strata_block::{
    BlockStatus, Driver, DriverClass, Error, EventLoop, IoBuf, OpenCtx, OpenFlags, Result,
    WriteFlags,
};
use tokio::sync::Semaphore;

/// What the test controls and sees: writes pass the gate one permit each,
/// flushes are counted.
struct Shared {
    gate: Semaphore,
    flushes: AtomicUsize,
}

struct GateDriver(Arc<Shared>);

#[async_trait]
impl Driver for GateDriver {
    fn format_name(&self) -> &'static str {
        "gate"
    }
    fn length(&self) -> u64 {
        1 << 20
    }
    async fn read(&self, _offset: u64, buf: IoBuf) -> Result<IoBuf> {
        Ok(buf)
    }
    async fn write(&self, _offset: u64, buf: IoBuf, _flags: WriteFlags) -> Result<IoBuf> {
        let permit = self
            .0
            .gate
            .acquire()
            .await
            .map_err(|_| Error::errno(libc::EIO))?;
        permit.forget();
        Ok(buf)
    }
    async fn flush(&self) -> Result<()> {
        self.0.flushes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
    async fn block_status(&self, _offset: u64, len: u64) -> Result<BlockStatus> {
        Ok(BlockStatus::data(len))
    }
}

struct GateClass(Arc<Shared>);

#[async_trait]
impl DriverClass for GateClass {
    fn name(&self) -> &'static str {
        "gate"
    }
    fn protocol_name(&self) -> Option<&'static str> {
        Some("gate")
    }
    async fn create(&self, _ctx: &OpenCtx, _filename: &str, _opts: Opts) -> Result<()> {
        Err(Error::unsupported("gate: no image creation"))
    }
    async fn open(&self, _ctx: &OpenCtx, _opts: &mut Opts) -> Result<Box<dyn Driver>> {
        Ok(Box::new(GateDriver(Arc::clone(&self.0))))
    }
}

#[test]
fn a_write_in_flight_across_a_flush_is_flushed_by_the_next() {
    let shared = Arc::new(Shared {
        gate: Semaphore::new(0),
        flushes: AtomicUsize::new(0),
    });
    let mut reg = (*strata_drivers::registry()).clone();
    reg.register(Arc::new(GateClass(Arc::clone(&shared))));
    let ctx = OpenCtx::new(Arc::new(reg), OpenFlags::default());
    let ev = EventLoop::new().unwrap();
    ev.block_on(async {
        let mut opts = Opts::new();
        opts.insert("driver".into(), "gate".into());
        let node = ctx.open_image(None, None, opts).await.unwrap();
        let flushes = || shared.flushes.load(Ordering::Acquire);
        // Nothing written yet: nothing to flush.
        node.flush().await.unwrap();
        assert_eq!(flushes(), 0);
        // A completed write makes the next flush reach the driver.
        shared.gate.add_permits(1);
        node.write(0, IoBuf::filled(512, 1), WriteFlags::default())
            .await
            .unwrap();
        node.flush().await.unwrap();
        assert_eq!(flushes(), 1);
        // A write held at the gate while a flush runs.
        let w = {
            let node = Arc::clone(&node);
            tokio::spawn(async move {
                node.write(512, IoBuf::filled(512, 2), WriteFlags::default())
                    .await
                    .map(drop)
            })
        };
        tokio::task::yield_now().await;
        node.flush().await.unwrap();
        let before = flushes();
        shared.gate.add_permits(1);
        w.await.unwrap().unwrap();
        node.flush().await.unwrap();
        assert_eq!(
            flushes(),
            before + 1,
            "the flush after the held write completed did not reach the driver"
        );
        // And nothing more to do after that.
        node.flush().await.unwrap();
        assert_eq!(flushes(), before + 1);
    });
}
