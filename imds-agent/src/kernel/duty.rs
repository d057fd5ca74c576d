//! Who writes the shared kernel state that outlives the agent: the node's current agent
//! alone.
use std::sync::Arc;

/// Writing shared kernel state that outlives the agent (verdicts, the node backstop's
/// attachments) is the duty of the node's current agent alone. While another agent takes
/// over ([`crate::handover`]) the duty is paused; it resumes if that agent goes away first.
#[derive(Clone, Debug, Default)]
pub struct Duty(Arc<parking_lot::Mutex<DutyState>>);

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum DutyState {
    #[default]
    Active,
    Paused,
    /// Active again after a pause: another agent may have changed the state meanwhile.
    Resumed,
}

impl Duty {
    /// Runs `work` unless paused, holding the duty meanwhile. `work` is told whether another
    /// agent may have written the state since this duty's last work (then re-read it); it is
    /// told so again until it succeeds.
    pub fn perform<T, E>(&self, work: impl FnOnce(bool) -> Result<T, E>) -> Option<Result<T, E>> {
        let mut state = self.0.lock();
        match *state {
            DutyState::Paused => None,
            DutyState::Active => Some(work(false)),
            DutyState::Resumed => {
                let done = work(true);
                if done.is_ok() {
                    *state = DutyState::Active;
                }
                Some(done)
            }
        }
    }

    /// Pauses the duty; returns once no work is under way.
    pub fn pause(&self) {
        *self.0.lock() = DutyState::Paused;
    }

    /// Resumes a paused duty.
    pub fn resume(&self) {
        let mut state = self.0.lock();
        if *state == DutyState::Paused {
            *state = DutyState::Resumed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_paused_duty_does_nothing_and_says_so_when_resumed() {
        let duty = Duty::default();
        let fresh = |fresh: bool| Ok::<_, ()>(fresh);
        assert_eq!(duty.perform(fresh), Some(Ok(false)));
        duty.pause();
        assert_eq!(duty.perform(fresh), None);
        duty.resume();
        assert_eq!(duty.perform(|_| Err::<bool, _>(())), Some(Err(())), "a failed re-read…");
        assert_eq!(duty.perform(fresh), Some(Ok(true)), "…is asked for again");
        assert_eq!(duty.perform(fresh), Some(Ok(false)));
        duty.resume();
        assert_eq!(duty.perform(fresh), Some(Ok(false)), "resuming an active duty changes nothing");
    }
}
