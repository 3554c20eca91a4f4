//! A token bucket for per-connection rate limits.

use tokio::time::Instant;

/// Allows `rate` events per second sustained, with bursts up to `2 * rate`.
/// A rate of 0 disables the limit.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> Self {
        let rate = f64::from(rate);
        Self {
            rate,
            capacity: rate * 2.0,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    /// Takes one token if available.
    pub fn try_take(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn burst_then_refill() {
        let mut b = TokenBucket::new(10);
        assert_eq!((0..25).filter(|_| b.try_take()).count(), 20, "burst of 2x rate");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..25).filter(|_| b.try_take()).count(), 5, "refills at rate");
        let mut unlimited = TokenBucket::new(0);
        assert!((0..10_000).all(|_| unlimited.try_take()));
    }
}
