//! Counts of events over the last hour, in one-minute buckets: what `/api/health` says
//! about refreshes, without keeping one entry per event.

use std::sync::Mutex;

const BUCKETS: usize = 60;

pub struct HourWindow {
    /// (minute since the epoch, count) per slot; a slot from an older minute is stale.
    slots: Mutex<[(i64, u64); BUCKETS]>,
}

impl Default for HourWindow {
    fn default() -> Self {
        HourWindow { slots: Mutex::new([(i64::MIN, 0); BUCKETS]) }
    }
}

impl HourWindow {
    /// Counts one event at `now` (Unix seconds).
    pub fn add(&self, now: i64) {
        let minute = now.div_euclid(60);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[minute.rem_euclid(BUCKETS as i64) as usize];
        if slot.0 != minute {
            *slot = (minute, 0);
        }
        slot.1 += 1;
    }

    /// Events in the 60 minutes up to `now`.
    pub fn total(&self, now: i64) -> u64 {
        let minute = now.div_euclid(60);
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.iter().filter(|(m, _)| *m > minute - BUCKETS as i64 && *m <= minute).map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::HourWindow;

    #[test]
    fn counts_the_last_hour_only() {
        let w = HourWindow::default();
        let t0 = 1_800_000_000;
        w.add(t0);
        w.add(t0 + 30);
        w.add(t0 + 1800);
        assert_eq!(w.total(t0 + 1800), 3);
        // An hour after the first two, only the third is left.
        assert_eq!(w.total(t0 + 3600 + 60), 1);
        // A slot reused a full hour later starts from zero.
        w.add(t0 + 3600);
        assert_eq!(w.total(t0 + 3600), 2);
        assert_eq!(w.total(t0 + 7200 + 1800), 0);
    }
}
