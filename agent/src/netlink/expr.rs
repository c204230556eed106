//! nf_tables expressions as nft generates them for the matches and verdicts of the IR: which
//! header bytes go into which register, and what they are compared with or looked up in.

use std::ffi::CString;

use nftnl_sys::libc;
use ruleset::ir::{AddrField, Family, TableFamily};

pub(super) const IPPROTO_ICMPV6: u8 = 58;
/// Where the next-header field sits in the IPv6 header.
pub(super) const IP6_NEXTHDR_OFFSET: u32 = 6;
/// Connection tracking state bits as the kernel exposes them (`NF_CT_STATE_BIT`).
pub(super) const CT_STATE_RELATED: u32 = 1 << 2;
pub(super) const CT_DIRECTION_REPLY: u8 = 1;
/// The loopback interface's index, the same in every network namespace.
pub(super) const LOOPBACK_IFINDEX: u32 = 1;
/// `skb->pkt_type` of a frame addressed to the receiving interface (`PACKET_HOST`).
pub(super) const PACKET_HOST: u8 = 0;
pub(super) const ETHERTYPE_IPV4: u16 = 0x0800;
pub(super) const ETHERTYPE_IPV6: u16 = 0x86dd;
pub(super) const ETHERTYPE_ARP: u16 = 0x0806;
/// The input interface's kind (`rtnl_link_ops->kind`); the libc crate has no name for it.
const NFT_META_IIFKIND: libc::c_int = 26;

/// One nf_tables expression, as nft would generate it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Ct {
        key: u32,
        dreg: u32,
    },
    /// `ct <key> set` from a register.
    CtSet {
        key: u32,
        sreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    /// `reg = (reg & mask) ^ xor`. `boolean` sends the operation (`NFT_BITWISE_BOOL`)
    /// explicitly, as nft does for a binary operation but not for a flag test.
    Bitwise {
        reg: u32,
        mask: Vec<u8>,
        xor: Vec<u8>,
        boolean: bool,
    },
    Cmp {
        op: u32,
        reg: u32,
        data: Vec<u8>,
    },
    Lookup {
        sreg: u32,
        /// The verdict register, for a verdict map.
        dreg: Option<u32>,
        set: CString,
        set_id: Option<u32>,
        /// Matches when the key is not in the set (`!= @set`).
        invert: bool,
    },
    /// `immediate` into the verdict register.
    Verdict(i32),
    /// `immediate` of a jump to the chain.
    Jump(CString),
}

/// A rule's expressions, with the protocol family already checked by an earlier match.
pub(super) struct Exprs {
    pub list: Vec<Expr>,
    table: TableFamily,
    family: Option<Family>,
}

impl Exprs {
    /// Expressions for a rule in a table of family `table`.
    pub(super) fn new(table: TableFamily) -> Self {
        Exprs {
            list: Vec::new(),
            table,
            family: None,
        }
    }

    pub(super) fn push(&mut self, expr: Expr) {
        self.list.push(expr);
    }

    /// What nft puts before any address match: `meta nfproto ipv4|ipv6` in an `inet` table,
    /// `meta protocol ip|ip6` (the ethertype) in a `bridge` table.
    pub(super) fn family(&mut self, family: Family) {
        if self.family == Some(family) {
            return;
        }
        self.family = Some(family);
        match self.table {
            TableFamily::Inet => {
                self.meta(libc::NFT_META_NFPROTO, reg(0));
                let proto = match family {
                    Family::V4 => libc::NFPROTO_IPV4,
                    Family::V6 => libc::NFPROTO_IPV6,
                };
                self.cmp(libc::NFT_CMP_EQ, vec![proto as u8]);
            }
            TableFamily::Bridge => {
                self.meta(libc::NFT_META_PROTOCOL, reg(0));
                let ethertype = match family {
                    Family::V4 => ETHERTYPE_IPV4,
                    Family::V6 => ETHERTYPE_IPV6,
                };
                self.cmp(libc::NFT_CMP_EQ, ethertype.to_be_bytes().to_vec());
            }
        }
    }

    /// `meta iifkind "veth"`: the kind as the kernel names it, NUL-padded to a name's 16 bytes.
    pub(super) fn iifkind_veth(&mut self) {
        self.meta(NFT_META_IIFKIND, reg(0));
        let mut kind = b"veth".to_vec();
        kind.resize(16, 0);
        self.cmp(libc::NFT_CMP_EQ, kind);
    }

    /// `ether type arp`: what nft puts before any ARP field in a `bridge` table.
    pub(super) fn arp(&mut self) {
        self.ether_type(ETHERTYPE_ARP);
    }

    /// What nft puts before an ICMPv6 field: [`Exprs::family`] in an `inet` table, but
    /// `ether type ip6` rather than `meta protocol` in a `bridge` table.
    pub(super) fn icmpv6(&mut self) {
        match self.table {
            TableFamily::Inet => self.family(Family::V6),
            TableFamily::Bridge if self.family != Some(Family::V6) => {
                self.family = Some(Family::V6);
                self.ether_type(ETHERTYPE_IPV6);
            }
            TableFamily::Bridge => {}
        }
    }

    /// `ether type <ethertype>`, read from the link-layer header.
    pub(super) fn ether_type(&mut self, ethertype: u16) {
        self.push(Expr::Payload {
            base: libc::NFT_PAYLOAD_LL_HEADER as u32,
            offset: 12,
            len: 2,
            dreg: reg(0),
        });
        self.cmp(libc::NFT_CMP_EQ, ethertype.to_be_bytes().to_vec());
    }

    pub(super) fn meta(&mut self, key: libc::c_int, dreg: u32) {
        self.push(Expr::Meta {
            key: key as u32,
            dreg,
        });
    }

    pub(super) fn cmp(&mut self, op: libc::c_int, data: Vec<u8>) {
        self.push(Expr::Cmp {
            op: op as u32,
            reg: reg(0),
            data,
        });
    }

    /// `ct mark & mask ^ xor` into register 1: the epoch bits alone (`xor` 0), or the mark
    /// with them replaced (`mask` the other bits, `xor` the new value).
    pub(super) fn ct_mark(&mut self, mask: u32, xor: u32) {
        self.push(Expr::Ct {
            key: libc::NFT_CT_MARK as u32,
            dreg: reg(0),
        });
        self.push(Expr::Bitwise {
            reg: reg(0),
            mask: mask.to_ne_bytes().to_vec(),
            xor: xor.to_ne_bytes().to_vec(),
            boolean: true,
        });
    }

    /// `@th,64,16 & 0xffc0 != 0xfe80`: the target of a neighbour advertisement is not in
    /// fe80::/10.
    pub(super) fn nd_target_not_link_local(&mut self) {
        self.push(Expr::Payload {
            base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
            offset: ND_TARGET_OFFSET,
            len: 2,
            dreg: reg(0),
        });
        self.push(Expr::Bitwise {
            reg: reg(0),
            mask: vec![0xff, 0xc0],
            xor: vec![0, 0],
            boolean: true,
        });
        self.push(Expr::Cmp {
            op: libc::NFT_CMP_NEQ as u32,
            reg: reg(0),
            data: vec![0xfe, 0x80],
        });
    }

    /// `ct state <bit>`: the state word masked to the bit, compared with zero.
    pub(super) fn ct_state(&mut self, bit: u32) {
        self.push(Expr::Ct {
            key: libc::NFT_CT_STATE as u32,
            dreg: reg(0),
        });
        self.push(Expr::Bitwise {
            reg: reg(0),
            mask: bit.to_ne_bytes().to_vec(),
            xor: vec![0; 4],
            boolean: false,
        });
        self.push(Expr::Cmp {
            op: libc::NFT_CMP_NEQ as u32,
            reg: reg(0),
            data: vec![0; 4],
        });
    }
}

/// The register `words` 32-bit words after the start of register 1, named as nft names it: a
/// 128-bit register when aligned to one, else a 32-bit register.
pub(super) fn reg(words: u32) -> u32 {
    if words % 4 == 0 {
        libc::NFT_REG_1 as u32 + words / 4
    } else {
        libc::NFT_REG32_00 as u32 + words
    }
}

pub(super) fn addr_len(family: Family) -> u32 {
    match family {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

/// Loads a source or destination address into the register `words` after register 1.
pub(super) fn addr_payload(family: Family, field: AddrField, words: u32) -> Expr {
    let offset = match (family, field) {
        (Family::V4, AddrField::Source) => 12,
        (Family::V4, AddrField::Destination) => 16,
        (Family::V6, AddrField::Source) => 8,
        (Family::V6, AddrField::Destination) => 24,
    };
    Expr::Payload {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset,
        len: addr_len(family),
        dreg: reg(words),
    }
}

/// `arp saddr ip`: the sender protocol address of an Ethernet/IPv4 ARP packet, after the
/// 8-byte fixed header and the 6-byte sender hardware address.
pub(super) fn arp_sender(dreg: u32) -> Expr {
    Expr::Payload {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset: 14,
        len: 4,
        dreg,
    }
}

/// `ether daddr`: the destination address of the Ethernet header.
pub(super) fn ether_destination(dreg: u32) -> Expr {
    Expr::Payload {
        base: libc::NFT_PAYLOAD_LL_HEADER as u32,
        offset: 0,
        len: 6,
        dreg,
    }
}

/// `ether saddr`: the source address of the Ethernet header.
pub(super) fn ether_source(dreg: u32) -> Expr {
    Expr::Payload {
        base: libc::NFT_PAYLOAD_LL_HEADER as u32,
        offset: 6,
        len: 6,
        dreg,
    }
}

/// Where a neighbour advertisement's target address starts in the ICMPv6 header.
const ND_TARGET_OFFSET: u32 = 8;

/// `@th,64,128`: the target address of a neighbour advertisement.
pub(super) fn nd_target(dreg: u32) -> Expr {
    Expr::Payload {
        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
        offset: ND_TARGET_OFFSET,
        len: 16,
        dreg,
    }
}

/// `th dport`: the two bytes after the source port of any transport header.
pub(super) fn dport(dreg: u32) -> Expr {
    Expr::Payload {
        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
        offset: 2,
        len: 2,
        dreg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_named_as_nft_names_them() {
        assert_eq!([reg(0), reg(1), reg(2), reg(4), reg(5)], [1, 9, 10, 2, 13]);
    }
}
