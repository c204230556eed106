//! The type-length-value user data `nft` attaches to tables, chains, rules, sets and set
//! elements (libnftnl `udata.h`): comments, and what `nft list` needs to print a set's type.

/// Comment of a table, chain, rule or set element.
pub(super) const COMMENT: u8 = 0;
pub(super) const SET_KEYBYTEORDER: u8 = 0;
pub(super) const SET_DATABYTEORDER: u8 = 1;
pub(super) const SET_KEY_TYPEOF: u8 = 3;
pub(super) const SET_DATA_INTERVAL: u8 = 6;
pub(super) const SET_COMMENT: u8 = 7;
pub(super) const TYPEOF_EXPR: u8 = 0;
pub(super) const TYPEOF_DATA: u8 = 1;
pub(super) const ELEM_FLAGS: u8 = 1;
/// Element flag: the range runs to the end of the address space (it has no end element).
pub(super) const ELEM_INTERVAL_OPEN: u32 = 1;
/// nft's byte orders: a plain address is big endian, a concatenation has none of its own.
pub(super) const BIG_ENDIAN: u32 = 2;
/// nft's `BYTEORDER_HOST_ENDIAN`, for string keys such as `ifname`.
pub(super) const HOST_ENDIAN: u32 = 1;
pub(super) const NO_BYTEORDER: u32 = 0;
/// nft's expression kinds, recorded for a `typeof` key.
pub(super) const EXPR_PAYLOAD: u32 = 7;
pub(super) const EXPR_CONCAT: u32 = 13;
/// The payload description nft records for `icmpv6 type`: protocol ICMPv6, field type.
pub(super) const PAYLOAD_ICMPV6: u32 = 14;
pub(super) const PAYLOAD_ICMPV6_TYPE: u32 = 1;

/// One user data entry: kind, length, value.
pub(super) fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 2);
    out.push(kind);
    // Every value is a comment (at most 129 bytes with its NUL) or a few words.
    out.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(value);
    out
}
