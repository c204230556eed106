//! The established-connection fast path: a ruleset epoch kept in a bit field of the ct mark.
//!
//! When `forward` has evaluated a packet in the original direction in full and lets it pass,
//! its last rule stamps the connection's ct mark with the current epoch (only the bits of
//! [`CtMarkBits`]; the others, which kube-proxy, Flannel and others may use, are kept). The
//! rule after the one for replies accepts later packets of a connection whose mark carries the
//! current epoch, without walking the policy chains again. It tests the mark alone: conntrack
//! starts every connection at mark 0 (or at its master's mark, for a related one, which the
//! `ct state related` rule accepts anyway), so a packet whose connection holds the current
//! epoch belongs to a connection this ruleset let through. Three expressions, where testing the
//! state and direction as well took eight.
//!
//! Every transaction that changes the table installs a new epoch, so after any change each
//! connection is evaluated again at its next packet: a change that denies it cuts it there.
//! A value is used again only after the agent has cleared it from every connection (see the
//! agent's `conntrack` module); the value 0 is never an epoch, so a fresh connection (mark 0)
//! never takes the fast path.
//!
//! The epoch is an input of the compiler ([`crate::Options::epoch`]) and of [`apply`]; nothing
//! here touches the kernel.

use crate::ir::{Match, Rule, Table, Verdict};

/// The ct mark bits the agent uses by default: the top byte, 255 epochs.
pub const DEFAULT_MASK: u32 = 0xff00_0000;

/// The chain the fast path lives in.
const CHAIN: &str = "forward";

/// The bit field of the ct mark holding the epoch: a contiguous run of at least two bits, or
/// none (fast path off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtMarkBits(u32);

impl CtMarkBits {
    /// `mask` must be 0 (off) or one contiguous run of at least two set bits: with a single
    /// bit the next epoch would be the current one, which could never be cleared beforehand.
    pub fn new(mask: u32) -> Result<Self, String> {
        if mask == 0 {
            return Ok(CtMarkBits(0));
        }
        let run = mask >> mask.trailing_zeros();
        if run & (run + 1) != 0 {
            return Err(format!(
                "ct mark bits {mask:#010x} are not one contiguous run of bits"
            ));
        }
        if mask.count_ones() < 2 {
            return Err(format!(
                "ct mark bits {mask:#010x}: at least two bits are needed"
            ));
        }
        Ok(CtMarkBits(mask))
    }

    pub const fn off() -> Self {
        CtMarkBits(0)
    }

    pub fn mask(self) -> u32 {
        self.0
    }

    pub fn is_off(self) -> bool {
        self.0 == 0
    }

    /// The highest epoch the field holds (255 for eight bits); 0 when off.
    pub fn max_epoch(self) -> u32 {
        if self.0 == 0 {
            0
        } else {
            self.0 >> self.0.trailing_zeros()
        }
    }
}

impl Default for CtMarkBits {
    fn default() -> Self {
        CtMarkBits(DEFAULT_MASK)
    }
}

/// One ruleset epoch: the value stamped on connections this ruleset let through, and whether
/// the fast path for connections carrying it is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epoch {
    bits: CtMarkBits,
    value: u32,
    fast_path: bool,
}

impl Epoch {
    /// Epoch 1 with the fast path on; with the bits off, nothing is stamped or skipped.
    pub fn first(bits: CtMarkBits) -> Self {
        Epoch {
            bits,
            value: u32::from(!bits.is_off()),
            fast_path: !bits.is_off(),
        }
    }

    /// The value after this one, 1 again after the highest, with the fast path on.
    pub fn next(self) -> Self {
        if self.bits.is_off() {
            return self;
        }
        let value = if self.value >= self.bits.max_epoch() {
            1
        } else {
            self.value + 1
        };
        Epoch {
            value,
            fast_path: true,
            ..self
        }
    }

    /// The same value, stamped but never skipped on.
    pub fn without_fast_path(self) -> Self {
        Epoch {
            fast_path: false,
            ..self
        }
    }

    /// The same value with the fast path on.
    pub fn with_fast_path(self) -> Self {
        Epoch {
            fast_path: !self.bits.is_off(),
            ..self
        }
    }

    pub fn bits(self) -> CtMarkBits {
        self.bits
    }

    pub fn value(self) -> u32 {
        self.value
    }

    pub fn fast_path(self) -> bool {
        self.fast_path
    }

    /// The value in place in the mark.
    pub fn mark(self) -> u32 {
        if self.bits.is_off() {
            0
        } else {
            self.value << self.bits.mask().trailing_zeros()
        }
    }

    /// The rule that goes after the reply rule in `forward`, if the fast path is on.
    pub fn fast_path_rule(self) -> Option<Rule> {
        (self.fast_path && !self.bits.is_off()).then(|| Rule {
            matches: vec![Match::CtMarkEpoch {
                mask: self.bits.mask(),
                value: self.mark(),
            }],
            verdict: Verdict::Accept,
            comment: Some(format!(
                "a connection this ruleset let through (epoch {})",
                self.value
            )),
        })
    }

    /// The rule that goes last in `forward`, if any bits are used.
    pub fn stamp_rule(self) -> Option<Rule> {
        (!self.bits.is_off()).then(|| Rule {
            matches: Vec::new(),
            verdict: Verdict::StampAccept {
                mask: self.bits.mask(),
                value: self.mark(),
            },
            comment: Some(format!("allowed: stamp epoch {}", self.value)),
        })
    }
}

impl Default for Epoch {
    fn default() -> Self {
        Epoch::first(CtMarkBits::default())
    }
}

/// Puts `epoch`'s rules in `table`'s `forward` chain in place of any earlier epoch's.
pub fn apply(table: &mut Table, epoch: Epoch) {
    let Some(chain) = table.chains.get_mut(CHAIN) else {
        return;
    };
    chain.rules.retain(|r| !is_epoch_rule(r));
    if let Some(rule) = epoch.fast_path_rule() {
        let after_replies = chain
            .rules
            .iter()
            .position(|r| r.matches == [Match::CtReply])
            .map_or(0, |i| i + 1);
        chain.rules.insert(after_replies, rule);
    }
    if let Some(rule) = epoch.stamp_rule() {
        chain.rules.push(rule);
    }
}

fn is_epoch_rule(rule: &Rule) -> bool {
    matches!(rule.verdict, Verdict::StampAccept { .. })
        || rule
            .matches
            .iter()
            .any(|m| matches!(m, Match::CtMarkEpoch { .. }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_must_be_one_run_of_two_bits_or_more() {
        assert!(CtMarkBits::new(0xff00_0000).is_ok());
        assert!(CtMarkBits::new(0x0000_0030).is_ok());
        assert!(CtMarkBits::new(0).is_ok_and(|b| b.is_off()));
        assert!(CtMarkBits::new(0x0100_0000).is_err());
        assert!(CtMarkBits::new(0xf0f0_0000).is_err());
    }

    #[test]
    fn epochs_skip_zero_and_wrap_to_one() {
        let bits = CtMarkBits::new(0x0000_0030).unwrap();
        let first = Epoch::first(bits);
        assert_eq!((first.value(), first.mark()), (1, 0x10));
        let values: Vec<u32> = std::iter::successors(Some(first), |e| Some(e.next()))
            .take(5)
            .map(Epoch::value)
            .collect();
        assert_eq!(values, [1, 2, 3, 1, 2]);
        assert_eq!(
            Epoch::first(CtMarkBits::default()).next().mark(),
            0x0200_0000
        );
    }

    #[test]
    fn off_adds_no_rule() {
        let epoch = Epoch::first(CtMarkBits::off());
        assert_eq!(epoch.fast_path_rule(), None);
        assert_eq!(epoch.stamp_rule(), None);
        let stamped_only = Epoch::default().without_fast_path();
        assert_eq!(stamped_only.fast_path_rule(), None);
        assert!(stamped_only.stamp_rule().is_some());
    }
}
