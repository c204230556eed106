//! Set keys and elements in the kernel's layout, as nft encodes them: key types, keys of
//! concatenations, and interval sets as start and end keys.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ruleset::ir::{Element, Family, IfName, Mac, SetKey};

use super::udata::{self, tlv};

/// nft's data type numbers (`enum datatypes` in nftables), as the kernel stores them in a set's
/// key type and `nft list` reads them back.
pub(super) mod datatype {
    pub const IPV4_ADDR: u32 = 7;
    pub const IPV6_ADDR: u32 = 8;
    pub const INET_PROTO: u32 = 12;
    pub const INET_SERVICE: u32 = 13;
    pub const ICMPV6_TYPE: u32 = 29;
    /// A raw payload field's type.
    pub const INTEGER: u32 = 4;
    pub const IFNAME: u32 = 41;
    pub const IFINDEX: u32 = 20;
    pub const ETHER_ADDR: u32 = 9;
    /// A concatenated type is its parts' numbers, each shifted in by this many bits.
    pub const CONCAT_SHIFT: u32 = 6;
}

/// One element as the kernel stores it.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ElementSpec {
    pub key: Vec<u8>,
    /// `NFT_SET_ELEM_INTERVAL_END`: the first key after a range.
    pub interval_end: bool,
    /// Verdict map data: `jump <chain>`.
    pub jump: Option<CString>,
    pub udata: Option<Vec<u8>>,
}

/// Key type number and key length of a set, as nft declares `type ...`. Each part of a
/// concatenation takes a whole number of 32-bit registers.
pub(super) fn key_type(key: SetKey) -> (u32, u32) {
    let addr = |f: Family| match f {
        Family::V4 => (datatype::IPV4_ADDR, 4),
        Family::V6 => (datatype::IPV6_ADDR, 16),
    };
    let ifname = (datatype::IFNAME, IfName::SIZE as u32);
    // Six bytes alone; a part of a concatenation takes two whole registers.
    let mac = (datatype::ETHER_ADDR, MAC_IN_CONCAT);
    let parts: Vec<(u32, u32)> = match key {
        SetKey::Addr(f) => vec![addr(f)],
        SetKey::AddrPair(f) => vec![addr(f), addr(f)],
        SetKey::AddrProtoPort(f) => vec![
            addr(f),
            (datatype::INET_PROTO, 4),
            (datatype::INET_SERVICE, 4),
        ],
        SetKey::Iface => vec![ifname],
        SetKey::IfaceAddr(f) => vec![ifname, addr(f)],
        SetKey::IfaceNdTarget => vec![ifname, (datatype::INTEGER, 16)],
        SetKey::NdTarget => vec![(datatype::INTEGER, 16)],
        SetKey::Mac => vec![(datatype::ETHER_ADDR, 6)],
        SetKey::IfaceMac => vec![ifname, mac],
        SetKey::IndexMacAddr(f) => vec![(datatype::IFINDEX, 4), mac, addr(f)],
    };
    parts.iter().fold((0, 0), |(t, l), (pt, pl)| {
        ((t << datatype::CONCAT_SHIFT) | pt, l + pl)
    })
}

/// The bytes a link-layer address takes in a concatenation: six, padded to two registers.
const MAC_IN_CONCAT: u32 = 8;

/// A link-layer address as a part of a concatenated key.
fn mac_in_concat(mac: &Mac) -> Vec<u8> {
    let mut bytes = mac.to_vec();
    bytes.resize(MAC_IN_CONCAT as usize, 0);
    bytes
}

pub(super) fn addr_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An element's key in the kernel's layout: parts in network byte order, each padded to 32 bits.
pub(super) fn key_bytes(element: &Element) -> Vec<u8> {
    match element {
        Element::Addr(ip) | Element::Range(ip, _) => addr_bytes(*ip),
        Element::AddrPair(a, b) => [addr_bytes(*a), addr_bytes(*b)].concat(),
        Element::AddrProtoPort(ip, proto, port) => {
            let [hi, lo] = port.to_be_bytes();
            [
                addr_bytes(*ip),
                vec![proto.number(), 0, 0, 0],
                vec![hi, lo, 0, 0],
            ]
            .concat()
        }
        Element::Iface(name) => name.bytes().to_vec(),
        Element::IfaceAddr(name, ip) => [name.bytes().to_vec(), addr_bytes(*ip)].concat(),
        Element::Mac(mac) => mac.to_vec(),
        Element::IfaceMac(name, mac) => [name.bytes().to_vec(), mac_in_concat(mac)].concat(),
        // The index in host byte order, as `meta iif` loads it.
        Element::IndexMacAddr(index, mac, ip) => [
            index.to_ne_bytes().to_vec(),
            mac_in_concat(mac),
            addr_bytes(*ip),
        ]
        .concat(),
    }
}

/// Whether an element has the shape of a set's key.
pub(super) fn fits(key: SetKey, interval: bool, element: &Element) -> bool {
    let f = key.family();
    let v = |ip: &IpAddr| Some(Family::of(ip)) == f;
    match (key, element) {
        (SetKey::Addr(_), Element::Addr(ip)) => v(ip),
        (SetKey::NdTarget, Element::Addr(ip)) => !interval && v(ip),
        (SetKey::Addr(_), Element::Range(lo, hi)) => interval && v(lo) && v(hi) && lo <= hi,
        (SetKey::AddrPair(_), Element::AddrPair(a, b)) => v(a) && v(b),
        (SetKey::AddrProtoPort(_), Element::AddrProtoPort(ip, _, _)) => v(ip),
        (SetKey::Iface, Element::Iface(_)) => !interval,
        (SetKey::IfaceAddr(_) | SetKey::IfaceNdTarget, Element::IfaceAddr(_, ip)) => {
            !interval && v(ip)
        }
        (SetKey::Mac, Element::Mac(_)) | (SetKey::IfaceMac, Element::IfaceMac(..)) => !interval,
        (SetKey::IndexMacAddr(_), Element::IndexMacAddr(_, _, ip)) => !interval && v(ip),
        _ => false,
    }
}

pub(super) fn plain_element(key: Vec<u8>) -> ElementSpec {
    ElementSpec {
        key,
        interval_end: false,
        jump: None,
        udata: None,
    }
}

/// The elements of a whole interval set as nft sends them: ranges in order, each a start key
/// and an end key one past its last address (none when it runs to the top of the address
/// space, marked open instead), after an end marker at the zero address when no range starts
/// there.
pub(super) fn interval_elements(elements: &[Element]) -> Vec<ElementSpec> {
    let mut specs = Vec::new();
    let first = elements.first().and_then(|first| match first {
        Element::Addr(ip)
        | Element::Range(ip, _)
        | Element::AddrPair(ip, _)
        | Element::AddrProtoPort(ip, _, _)
        | Element::IfaceAddr(_, ip)
        | Element::IndexMacAddr(_, _, ip) => Some(*ip),
        Element::Iface(_) | Element::Mac(_) | Element::IfaceMac(..) => None,
    });
    if let Some(lo) = first {
        let zero = match lo {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        if lo != zero {
            specs.push(ElementSpec {
                interval_end: true,
                ..plain_element(addr_bytes(zero))
            });
        }
    }
    specs.extend(elements.iter().flat_map(element_specs));
    specs
}

/// The kernel elements for one IR element: a range becomes its start and end keys; anything
/// else is one key.
pub(super) fn element_specs(element: &Element) -> Vec<ElementSpec> {
    let Element::Range(lo, hi) = element else {
        return vec![plain_element(key_bytes(element))];
    };
    match successor(*hi) {
        Some(end) => vec![
            plain_element(addr_bytes(*lo)),
            ElementSpec {
                interval_end: true,
                ..plain_element(addr_bytes(end))
            },
        ],
        None => vec![ElementSpec {
            udata: Some(tlv(
                udata::ELEM_FLAGS,
                &udata::ELEM_INTERVAL_OPEN.to_ne_bytes(),
            )),
            ..plain_element(addr_bytes(*lo))
        }],
    }
}

/// The next address, or none at the top of the address space.
fn successor(ip: IpAddr) -> Option<IpAddr> {
    match ip {
        IpAddr::V4(a) => u32::from(a)
            .checked_add(1)
            .map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        IpAddr::V6(a) => u128::from(a)
            .checked_add(1)
            .map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    }
}

/// Upper bound of the bytes one element takes in a message (`sys` relies on it to never write
/// past a message buffer): the element's nest, its key's nest and value, and when present its
/// flags, its verdict's nests, code and chain, and its user data, each padded to 4 bytes.
pub(super) fn encoded_size(e: &ElementSpec) -> usize {
    let attr = |len: usize| 4 + len.next_multiple_of(4);
    let mut size = attr(0) + attr(attr(e.key.len()));
    if e.interval_end {
        size += attr(4);
    }
    if let Some(chain) = &e.jump {
        size += attr(attr(attr(4) + attr(chain.as_bytes_with_nul().len())));
    }
    if let Some(u) = &e.udata {
        size += attr(u.len());
    }
    size
}

#[cfg(test)]
mod tests {
    use ruleset::ir::Protocol;

    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn key_types_are_nfts() {
        assert_eq!(key_type(SetKey::Addr(Family::V4)), (7, 4));
        assert_eq!(key_type(SetKey::Addr(Family::V6)), (8, 16));
        assert_eq!(key_type(SetKey::AddrPair(Family::V4)), (0x1c7, 8));
        assert_eq!(key_type(SetKey::AddrPair(Family::V6)), (0x208, 32));
        assert_eq!(key_type(SetKey::AddrProtoPort(Family::V4)), (0x730d, 12));
        assert_eq!(key_type(SetKey::AddrProtoPort(Family::V6)), (0x830d, 24));
    }

    #[test]
    fn concatenated_keys_pad_each_part() {
        let e = Element::AddrProtoPort(v4("10.244.1.10"), Protocol::Tcp, 8080);
        assert_eq!(
            key_bytes(&e),
            [10, 244, 1, 10, 6, 0, 0, 0, 0x1f, 0x90, 0, 0]
        );
    }

    #[test]
    fn interval_set_elements_follow_nft() {
        let elements = [
            Element::Range(v4("10.0.0.0"), v4("10.243.255.255")),
            Element::Range(v4("169.254.169.255"), v4("255.255.255.255")),
        ];
        let specs = interval_elements(&elements);
        let summary: Vec<(Vec<u8>, bool, bool)> = specs
            .iter()
            .map(|s| (s.key.clone(), s.interval_end, s.udata.is_some()))
            .collect();
        assert_eq!(
            summary,
            [
                (vec![0, 0, 0, 0], true, false),
                (vec![10, 0, 0, 0], false, false),
                (vec![10, 244, 0, 0], true, false),
                (vec![169, 254, 169, 255], false, true),
            ]
        );
        let from_zero = interval_elements(&[Element::Range(v4("0.0.0.0"), v4("9.255.255.255"))]);
        assert_eq!(
            from_zero.len(),
            2,
            "no end marker when a range starts at zero"
        );
    }
}
