//! What a job is and may do: its states, the moves between them and the
//! verbs each state accepts (QEMU: JobSTT and JobVerbTable in job.c), and
//! the kinds of job.

/// A job's state (QEMU: JobStatus), in QEMU's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

/// Which state may follow which: `MOVES[from][to]`, states in QEMU's order.
const MOVES: [[bool; 11]; 11] = {
    const O: bool = false;
    const I: bool = true;
    [
        //U, C, R, P, Y, S, W, D, X, E, N
        [O, I, O, O, O, O, O, O, O, O, O], // undefined
        [O, O, I, O, O, O, O, O, I, O, I], // created
        [O, O, O, I, I, O, I, O, I, O, O], // running
        [O, O, I, O, O, O, O, O, O, O, O], // paused
        [O, O, O, O, O, I, I, O, I, O, O], // ready
        [O, O, O, O, I, O, O, O, O, O, O], // standby
        [O, O, O, O, O, O, O, I, I, O, O], // waiting
        [O, O, O, O, O, O, O, O, I, I, O], // pending
        [O, O, O, O, O, O, O, O, I, I, O], // aborting
        [O, O, O, O, O, O, O, O, O, O, I], // concluded
        [O, O, O, O, O, O, O, O, O, O, O], // null
    ]
};

impl JobStatus {
    /// The name QMP uses.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
        }
    }

    /// Whether a job in this state may move to `to`.
    pub fn may_become(self, to: JobStatus) -> bool {
        MOVES[self as usize][to as usize]
    }

    /// The job's work is over, whatever its outcome (QEMU:
    /// job_is_completed).
    pub fn is_completed(self) -> bool {
        matches!(
            self,
            JobStatus::Waiting
                | JobStatus::Pending
                | JobStatus::Aborting
                | JobStatus::Concluded
                | JobStatus::Null
        )
    }

    /// The job waits for `job-complete` (QEMU: job_is_ready).
    pub fn is_ready(self) -> bool {
        matches!(self, JobStatus::Ready | JobStatus::Standby)
    }
}

/// What a user may ask of a job (QEMU: JobVerb).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobVerb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Complete,
    Finalize,
    Dismiss,
    Change,
}

/// In which states each verb is accepted: `VERBS[verb][state]`.
const VERBS: [[bool; 11]; 8] = {
    const O: bool = false;
    const I: bool = true;
    [
        //U, C, R, P, Y, S, W, D, X, E, N
        [O, I, I, I, I, I, I, I, O, O, O], // cancel
        [O, I, I, I, I, I, O, O, O, O, O], // pause
        [O, I, I, I, I, I, O, O, O, O, O], // resume
        [O, I, I, I, I, I, O, O, O, O, O], // set-speed
        [O, O, O, O, I, I, O, O, O, O, O], // complete
        [O, O, O, O, O, O, O, I, O, O, O], // finalize
        [O, O, O, O, O, O, O, O, O, I, O], // dismiss
        [O, I, I, I, I, I, O, O, O, O, O], // change
    ]
};

impl JobVerb {
    /// The name QMP's errors use.
    pub fn as_str(self) -> &'static str {
        match self {
            JobVerb::Cancel => "cancel",
            JobVerb::Pause => "pause",
            JobVerb::Resume => "resume",
            JobVerb::SetSpeed => "set-speed",
            JobVerb::Complete => "complete",
            JobVerb::Finalize => "finalize",
            JobVerb::Dismiss => "dismiss",
            JobVerb::Change => "change",
        }
    }

    /// Whether a job in `status` accepts this verb.
    pub fn allowed_in(self, status: JobStatus) -> bool {
        VERBS[self as usize][status as usize]
    }
}

/// The kind of a job (QEMU: JobType).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobType {
    Commit,
    Stream,
    Mirror,
    Backup,
    Create,
    Amend,
    SnapshotLoad,
    SnapshotSave,
    SnapshotDelete,
}

impl JobType {
    /// The name QMP uses.
    pub fn as_str(self) -> &'static str {
        match self {
            JobType::Commit => "commit",
            JobType::Stream => "stream",
            JobType::Mirror => "mirror",
            JobType::Backup => "backup",
            JobType::Create => "create",
            JobType::Amend => "amend",
            JobType::SnapshotLoad => "snapshot-load",
            JobType::SnapshotSave => "snapshot-save",
            JobType::SnapshotDelete => "snapshot-delete",
        }
    }

    /// Block jobs have a speed, an I/O status and the BLOCK_JOB_* events,
    /// and `query-block-jobs` lists them.
    pub fn is_block_job(self) -> bool {
        matches!(
            self,
            JobType::Commit | JobType::Stream | JobType::Mirror | JobType::Backup
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use JobStatus::*;

    const ALL: [JobStatus; 11] = [
        Undefined, Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded,
        Null,
    ];

    #[test]
    fn every_state_but_null_has_a_way_on_and_every_path_ends_in_null() {
        for s in ALL {
            let next: Vec<_> = ALL.iter().filter(|&&t| s.may_become(t)).collect();
            assert_eq!(next.is_empty(), s == Null, "{s:?}");
        }
        // From every state, following moves reaches null.
        for s in ALL {
            let mut seen = vec![s];
            let mut i = 0;
            while i < seen.len() {
                for t in ALL {
                    if seen[i].may_become(t) && !seen.contains(&t) {
                        seen.push(t);
                    }
                }
                i += 1;
            }
            assert!(seen.contains(&Null), "{s:?}");
        }
    }

    #[test]
    fn verbs_as_qemu_accepts_them() {
        assert!(JobVerb::Complete.allowed_in(Ready));
        assert!(!JobVerb::Complete.allowed_in(Running));
        assert!(JobVerb::Cancel.allowed_in(Pending));
        assert!(!JobVerb::Cancel.allowed_in(Concluded));
        assert!(JobVerb::Dismiss.allowed_in(Concluded));
        assert!(JobVerb::Finalize.allowed_in(Pending));
        assert!(!JobVerb::Pause.allowed_in(Waiting));
        // A paused job pauses and moves back to where it was.
        assert!(Running.may_become(Paused) && Paused.may_become(Running));
        assert!(Ready.may_become(Standby) && Standby.may_become(Ready));
    }
}
