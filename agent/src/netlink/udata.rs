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
pub(super) const EXPR_META: u32 = 9;
/// nft's `NFT_META_IIFNAME`, as recorded for a `typeof` key.
const META_IIFNAME: u32 = 6;
/// A raw payload's base as nft records it (`PROTO_BASE_TRANSPORT_HDR`).
const PAYLOAD_BASE_TRANSPORT: u32 = 3;
/// The payload description nft records for `icmpv6 type`: protocol ICMPv6, field type.
pub(super) const PAYLOAD_ICMPV6: u32 = 14;
pub(super) const PAYLOAD_ICMPV6_TYPE: u32 = 1;

/// What nft records for `typeof @th,64,128`: a raw transport-header payload of 128 bits at
/// bit 64, where a neighbour advertisement's target address is.
pub(super) fn typeof_nd_target() -> Vec<u8> {
    let word = |v: u32| v.to_ne_bytes();
    let mut raw = Vec::new();
    for (field, value) in [
        (0, 0),
        (1, 0),
        (2, PAYLOAD_BASE_TRANSPORT),
        (3, 64),
        (4, 128),
    ] {
        raw.extend(tlv(field, &word(value)));
    }
    let mut payload = tlv(TYPEOF_EXPR, &word(EXPR_PAYLOAD));
    payload.extend(tlv(TYPEOF_DATA, &raw));
    payload
}

/// What nft records for `typeof iifname . @th,64,128`: a concatenation of `meta iifname` and
/// [`typeof_nd_target`].
pub(super) fn typeof_iifname_nd_target() -> Vec<u8> {
    let word = |v: u32| v.to_ne_bytes();
    let mut meta = tlv(TYPEOF_EXPR, &word(EXPR_META));
    meta.extend(tlv(TYPEOF_DATA, &tlv(0, &word(META_IIFNAME))));
    let payload = typeof_nd_target();
    let mut parts = tlv(0, &meta);
    parts.extend(tlv(1, &payload));
    let mut out = tlv(TYPEOF_EXPR, &word(EXPR_CONCAT));
    out.extend(tlv(TYPEOF_DATA, &parts));
    out
}

/// One user data entry: kind, length, value.
pub(super) fn tlv(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 2);
    out.push(kind);
    // Every value is a comment (at most 129 bytes with its NUL) or a few words.
    out.push(u8::try_from(value.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(value);
    out
}
