//! The agent's only unsafe code: libnftnl objects built from the plain messages of
//! [`super::plan`] and framed into one batch by `nftnl::Batch`, and the libmnl socket the batch
//! goes through. Everything it is given is already validated (names are C strings, element
//! lists fit one message); what can still fail is allocation inside libnftnl, reported as
//! [`Unencodable`].

#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::ffi::{c_char, c_void, CStr};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::ptr::NonNull;

use nftnl::{Batch, MsgType, NlMsg};
use nftnl_sys::{self as sys, libc};

use super::element::encoded_size;
use super::expr::Expr;
use super::plan::{ElementList, Message, Op, SetSpec};

/// The message at this index could not be built: too large for one netlink message, or
/// libnftnl failed to allocate.
#[derive(Debug)]
pub(super) struct Unencodable(pub usize);

/// A whole batch, ready for one `send`.
pub(super) struct Encoded {
    pub bytes: Vec<u8>,
    /// Sequence numbers of all messages that ask for an acknowledgement, batch start and end
    /// included when the kernel acknowledges those (Linux 6.10 and later).
    pub seqs: Range<u32>,
}

/// Frames `ops` between a batch start and end, in order.
pub(super) fn encode<'a>(
    messages: impl Iterator<Item = &'a Message>,
) -> Result<Encoded, Unencodable> {
    let mut batch = Batch::new();
    for (index, message) in messages.enumerate() {
        let built = build(&message.op, message.family).ok_or(Unencodable(index))?;
        let family = u16::try_from(message.family).map_err(|_| Unencodable(index))?;
        batch.add(&Framed(built, family), MsgType::Add);
    }
    let batch = batch.finalize();
    let bytes = batch.iter().flatten().copied().collect();
    Ok(Encoded {
        bytes,
        seqs: batch.sequence_numbers(),
    })
}

/// Owners of libnftnl objects: each frees its object unless handed over to another one.
macro_rules! owner {
    ($name:ident, $raw:ty, $alloc:path, $free:path) => {
        struct $name(NonNull<$raw>);

        impl $name {
            fn new() -> Option<Self> {
                // SAFETY: the allocator takes no arguments and returns null or a new object.
                NonNull::new(unsafe { $alloc() }).map($name)
            }

            fn ptr(&self) -> *mut $raw {
                self.0.as_ptr()
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: the object came from the matching allocator and is owned here alone.
                unsafe { $free(self.0.as_ptr()) }
            }
        }
    };
}

owner!(
    TableObj,
    sys::nftnl_table,
    sys::nftnl_table_alloc,
    sys::nftnl_table_free
);
owner!(
    ChainObj,
    sys::nftnl_chain,
    sys::nftnl_chain_alloc,
    sys::nftnl_chain_free
);
owner!(
    SetObj,
    sys::nftnl_set,
    sys::nftnl_set_alloc,
    sys::nftnl_set_free
);
owner!(
    ElemObj,
    sys::nftnl_set_elem,
    sys::nftnl_set_elem_alloc,
    sys::nftnl_set_elem_free
);
owner!(
    RuleObj,
    sys::nftnl_rule,
    sys::nftnl_rule_alloc,
    sys::nftnl_rule_free
);

impl ElemObj {
    /// Hands the element to `set`, which frees it from now on.
    fn give_to(self, set: &SetObj) {
        let elem = self.ptr();
        std::mem::forget(self);
        // SAFETY: both objects are valid; the set takes ownership of the element.
        unsafe { sys::nftnl_set_elem_add(set.ptr(), elem) }
    }
}

/// An expression before it is added to a rule.
struct ExprObj(NonNull<sys::nftnl_expr>);

impl ExprObj {
    fn new(kind: &CStr) -> Option<Self> {
        // SAFETY: `kind` is a valid C string; the result is null or a new expression.
        NonNull::new(unsafe { sys::nftnl_expr_alloc(kind.as_ptr()) }).map(ExprObj)
    }

    fn u32(&self, attr: u32, value: u32) {
        // SAFETY: the expression is valid; libnftnl checks the attribute against its kind.
        unsafe { sys::nftnl_expr_set_u32(self.0.as_ptr(), attr as u16, value) }
    }

    fn data(&self, attr: u32, value: &[u8]) -> Option<()> {
        let len = value_len(value)?;
        // SAFETY: `value` is valid for `len` bytes, which libnftnl copies (into a 64-byte
        // buffer for data operands: `value_len` checked they fit).
        let rc = unsafe {
            sys::nftnl_expr_set(self.0.as_ptr(), attr as u16, value.as_ptr().cast(), len)
        };
        (rc >= 0).then_some(())
    }

    fn str(&self, attr: u32, value: &CStr) -> Option<()> {
        // SAFETY: `value` is a valid C string, which libnftnl copies.
        let rc = unsafe { sys::nftnl_expr_set_str(self.0.as_ptr(), attr as u16, value.as_ptr()) };
        (rc >= 0).then_some(())
    }

    /// Appends the expression to `rule`, which frees it from now on.
    fn give_to(self, rule: &RuleObj) {
        let expr = self.0.as_ptr();
        std::mem::forget(self);
        // SAFETY: both objects are valid; the rule takes ownership of the expression.
        unsafe { sys::nftnl_rule_add_expr(rule.ptr(), expr) }
    }
}

impl Drop for ExprObj {
    fn drop(&mut self) {
        // SAFETY: the expression came from `nftnl_expr_alloc` and belongs to no rule.
        unsafe { sys::nftnl_expr_free(self.0.as_ptr()) }
    }
}

/// Result of a libnftnl setter that copies: negative when it could not allocate.
fn copied(rc: libc::c_int) -> Option<()> {
    (rc >= 0).then_some(())
}

fn len32(bytes: &[u8]) -> Option<u32> {
    u32::try_from(bytes.len()).ok()
}

/// Length of a key or expression operand, which libnftnl copies into a fixed 64-byte buffer
/// (`NFT_DATA_VALUE_MAXLEN`); none when it would not fit.
fn value_len(bytes: &[u8]) -> Option<u32> {
    (bytes.len() <= 64).then(|| len32(bytes)).flatten()
}

/// One message, built: the libnftnl object with the message type and flags it goes out with.
enum Built {
    Table(TableObj, u16, u16),
    Chain(ChainObj, u16, u16),
    Set(SetObj, u16, u16),
    Elements(SetObj, u16, u16),
    Rule(RuleObj, u16, u16),
}

const ACK: u16 = libc::NLM_F_ACK as u16;
/// `NFT_LOOKUP_F_INV`: the lookup matches when the key is absent.
const NFT_LOOKUP_F_INV: u32 = 1;
/// The bitwise operation attribute of libnftnl 1.1.6 on, which nftnl-sys's default bindings
/// predate; the libnftnl linked here has it.
const NFTNL_EXPR_BITWISE_OP: u32 = 6;
const NFT_BITWISE_BOOL: u32 = 0;
const CREATE: u16 = libc::NLM_F_CREATE as u16;
const APPEND: u16 = libc::NLM_F_APPEND as u16;

fn msg(kind: libc::c_int) -> u16 {
    kind as u16
}

/// More bytes than the message for `op` can take: attributes are at most their payload plus
/// a 4-byte header plus 3 bytes of padding, and every number in a message is at most 8 bytes.
fn size_bound(op: &Op) -> usize {
    let attr = |len: usize| len + 8;
    let name = |s: &CStr| attr(s.to_bytes_with_nul().len());
    let udata = |u: &Option<Vec<u8>>| u.as_ref().map_or(0, |u| attr(u.len()));
    let fixed = 256;
    fixed
        + match op {
            Op::AddTable { table, udata: u } => name(table) + udata(u),
            Op::DeleteTable { table } => name(table),
            Op::AddChain {
                table,
                name: n,
                udata: u,
                ..
            } => name(table) + name(n) + udata(u),
            Op::DeleteChain { table, name: n } | Op::FlushChain { table, name: n } => {
                name(table) + name(n)
            }
            Op::AddSet(spec) => name(&spec.table) + name(&spec.name) + attr(spec.udata.len()),
            Op::DeleteSet { table, name: n } => name(table) + name(n),
            Op::AddElements(list) | Op::DeleteElements(list) => {
                name(&list.table)
                    + name(&list.set)
                    + list.elements.iter().map(encoded_size).sum::<usize>()
            }
            Op::AddRule {
                table,
                chain,
                exprs,
                udata: u,
            } => {
                name(table)
                    + name(chain)
                    + udata(u)
                    + exprs
                        .iter()
                        .map(|e| {
                            128 + match e {
                                Expr::Bitwise { mask, xor, .. } => {
                                    attr(mask.len()) + attr(xor.len())
                                }
                                Expr::Cmp { data, .. } => attr(data.len()),
                                Expr::Lookup { set, .. } => name(set),
                                _ => 0,
                            }
                        })
                        .sum::<usize>()
            }
        }
}

fn build(op: &Op, family: u32) -> Option<Built> {
    // The buffer a message is written into holds `nft_nlmsg_maxsize()` bytes and libnftnl
    // does not check: a message that might not fit is not built.
    if size_bound(op) > nftnl::nft_nlmsg_maxsize() as usize {
        return None;
    }
    Some(match op {
        Op::AddTable { table, udata } => Built::Table(
            table_obj(family, table, udata.as_deref())?,
            msg(libc::NFT_MSG_NEWTABLE),
            CREATE | ACK,
        ),
        Op::DeleteTable { table } => Built::Table(
            table_obj(family, table, None)?,
            msg(libc::NFT_MSG_DELTABLE),
            ACK,
        ),
        Op::AddChain {
            table,
            name,
            hook,
            udata,
        } => {
            let chain = chain_obj(family, table, name)?;
            let c = chain.ptr();
            if let Some(hook) = hook {
                // SAFETY: `c` is a valid chain; the strings are valid C strings, copied.
                unsafe {
                    sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16, hook.hooknum);
                    sys::nftnl_chain_set_s32(c, sys::NFTNL_CHAIN_PRIO as u16, hook.priority);
                    copied(sys::nftnl_chain_set_str(
                        c,
                        sys::NFTNL_CHAIN_TYPE as u16,
                        c"filter".as_ptr(),
                    ))?;
                    sys::nftnl_chain_set_u32(
                        c,
                        sys::NFTNL_CHAIN_POLICY as u16,
                        libc::NF_ACCEPT as u32,
                    );
                }
            }
            if let Some(u) = udata {
                // SAFETY: `u` is valid for its length, which libnftnl copies.
                copied(unsafe {
                    sys::nftnl_chain_set_data(
                        c,
                        sys::NFTNL_CHAIN_USERDATA as u16,
                        u.as_ptr().cast(),
                        len32(u)?,
                    )
                })?;
            }
            Built::Chain(chain, msg(libc::NFT_MSG_NEWCHAIN), CREATE | ACK)
        }
        Op::DeleteChain { table, name } => Built::Chain(
            chain_obj(family, table, name)?,
            msg(libc::NFT_MSG_DELCHAIN),
            ACK,
        ),
        Op::FlushChain { table, name } => Built::Rule(
            rule_obj(family, table, name)?,
            msg(libc::NFT_MSG_DELRULE),
            ACK,
        ),
        Op::AddSet(spec) => Built::Set(
            set_obj(family, spec)?,
            msg(libc::NFT_MSG_NEWSET),
            CREATE | ACK,
        ),
        Op::DeleteSet { table, name } => Built::Set(
            set_ref(family, table, name, None)?,
            msg(libc::NFT_MSG_DELSET),
            ACK,
        ),
        Op::AddElements(list) => Built::Elements(
            elements_obj(family, list)?,
            msg(libc::NFT_MSG_NEWSETELEM),
            CREATE | ACK,
        ),
        Op::DeleteElements(list) => Built::Elements(
            elements_obj(family, list)?,
            msg(libc::NFT_MSG_DELSETELEM),
            ACK,
        ),
        Op::AddRule {
            table,
            chain,
            exprs,
            udata,
        } => {
            let rule = rule_obj(family, table, chain)?;
            for e in exprs {
                expr_obj(e)?.give_to(&rule);
            }
            if let Some(u) = udata {
                // SAFETY: `u` is valid for its length, which libnftnl copies.
                copied(unsafe {
                    sys::nftnl_rule_set_data(
                        rule.ptr(),
                        sys::NFTNL_RULE_USERDATA as u16,
                        u.as_ptr().cast(),
                        len32(u)?,
                    )
                })?;
            }
            Built::Rule(rule, msg(libc::NFT_MSG_NEWRULE), CREATE | APPEND | ACK)
        }
    })
}

fn table_obj(family: u32, name: &CStr, udata: Option<&[u8]>) -> Option<TableObj> {
    let table = TableObj::new()?;
    let t = table.ptr();
    // SAFETY: `t` is a valid table; strings and data are valid and copied by libnftnl.
    unsafe {
        sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, family);
        copied(sys::nftnl_table_set_str(
            t,
            sys::NFTNL_TABLE_NAME as u16,
            name.as_ptr(),
        ))?;
        sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FLAGS as u16, 0);
        if let Some(u) = udata {
            copied(sys::nftnl_table_set_data(
                t,
                sys::NFTNL_TABLE_USERDATA as u16,
                u.as_ptr().cast(),
                len32(u)?,
            ))?;
        }
    }
    Some(table)
}

fn chain_obj(family: u32, table: &CStr, name: &CStr) -> Option<ChainObj> {
    let chain = ChainObj::new()?;
    let c = chain.ptr();
    // SAFETY: `c` is a valid chain; the strings are valid and copied by libnftnl.
    unsafe {
        sys::nftnl_chain_set_u32(c, sys::NFTNL_CHAIN_FAMILY as u16, family);
        copied(sys::nftnl_chain_set_str(
            c,
            sys::NFTNL_CHAIN_TABLE as u16,
            table.as_ptr(),
        ))?;
        copied(sys::nftnl_chain_set_str(
            c,
            sys::NFTNL_CHAIN_NAME as u16,
            name.as_ptr(),
        ))?;
    }
    Some(chain)
}

fn rule_obj(family: u32, table: &CStr, chain: &CStr) -> Option<RuleObj> {
    let rule = RuleObj::new()?;
    let r = rule.ptr();
    // SAFETY: `r` is a valid rule; the strings are valid and copied by libnftnl.
    unsafe {
        sys::nftnl_rule_set_u32(r, sys::NFTNL_RULE_FAMILY as u16, family);
        copied(sys::nftnl_rule_set_str(
            r,
            sys::NFTNL_RULE_TABLE as u16,
            table.as_ptr(),
        ))?;
        copied(sys::nftnl_rule_set_str(
            r,
            sys::NFTNL_RULE_CHAIN as u16,
            chain.as_ptr(),
        ))?;
    }
    Some(rule)
}

/// A set named by table, name and (when created in the same batch) id.
fn set_ref(family: u32, table: &CStr, name: &CStr, id: Option<u32>) -> Option<SetObj> {
    let set = SetObj::new()?;
    let s = set.ptr();
    // SAFETY: `s` is a valid set; the strings are valid and copied by libnftnl.
    unsafe {
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FAMILY as u16, family);
        copied(sys::nftnl_set_set_str(
            s,
            sys::NFTNL_SET_TABLE as u16,
            table.as_ptr(),
        ))?;
        copied(sys::nftnl_set_set_str(
            s,
            sys::NFTNL_SET_NAME as u16,
            name.as_ptr(),
        ))?;
        if let Some(id) = id {
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_ID as u16, id);
        }
    }
    Some(set)
}

fn set_obj(family: u32, spec: &SetSpec) -> Option<SetObj> {
    let set = set_ref(family, &spec.table, &spec.name, Some(spec.id))?;
    let s = set.ptr();
    // SAFETY: `s` is a valid set; the user data is valid for its length and copied.
    unsafe {
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_FLAGS as u16, spec.flags);
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_TYPE as u16, spec.key_type);
        sys::nftnl_set_set_u32(s, sys::NFTNL_SET_KEY_LEN as u16, spec.key_len);
        if spec.verdict_map {
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_TYPE as u16, libc::NFT_DATA_VERDICT);
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DATA_LEN as u16, 0);
        }
        if let Some(size) = spec.size {
            sys::nftnl_set_set_u32(s, sys::NFTNL_SET_DESC_SIZE as u16, size);
        }
        copied(sys::nftnl_set_set_data(
            s,
            sys::NFTNL_SET_USERDATA as u16,
            spec.udata.as_ptr().cast(),
            len32(&spec.udata)?,
        ))?;
    }
    Some(set)
}

fn elements_obj(family: u32, list: &ElementList) -> Option<SetObj> {
    let set = set_ref(family, &list.table, &list.set, list.set_id)?;
    for spec in &list.elements {
        let elem = ElemObj::new()?;
        let e = elem.ptr();
        // SAFETY: `e` is a valid element; key, chain and user data are valid and copied, the
        // key into a 64-byte buffer that `value_len` checked it fits.
        unsafe {
            copied(sys::nftnl_set_elem_set(
                e,
                sys::NFTNL_SET_ELEM_KEY as u16,
                spec.key.as_ptr().cast(),
                value_len(&spec.key)?,
            ))?;
            if spec.interval_end {
                sys::nftnl_set_elem_set_u32(
                    e,
                    sys::NFTNL_SET_ELEM_FLAGS as u16,
                    libc::NFT_SET_ELEM_INTERVAL_END as u32,
                );
            }
            if let Some(chain) = &spec.jump {
                sys::nftnl_set_elem_set_u32(
                    e,
                    sys::NFTNL_SET_ELEM_VERDICT as u16,
                    libc::NFT_JUMP as u32,
                );
                copied(sys::nftnl_set_elem_set_str(
                    e,
                    sys::NFTNL_SET_ELEM_CHAIN as u16,
                    chain.as_ptr(),
                ))?;
            }
            if let Some(u) = &spec.udata {
                copied(sys::nftnl_set_elem_set(
                    e,
                    sys::NFTNL_SET_ELEM_USERDATA as u16,
                    u.as_ptr().cast(),
                    len32(u)?,
                ))?;
            }
        }
        elem.give_to(&set);
    }
    Some(set)
}

fn expr_obj(expr: &Expr) -> Option<ExprObj> {
    Some(match expr {
        Expr::Meta { key, dreg } => {
            let e = ExprObj::new(c"meta")?;
            e.u32(sys::NFTNL_EXPR_META_KEY, *key);
            e.u32(sys::NFTNL_EXPR_META_DREG, *dreg);
            e
        }
        Expr::Ct { key, dreg } => {
            let e = ExprObj::new(c"ct")?;
            e.u32(sys::NFTNL_EXPR_CT_KEY, *key);
            e.u32(sys::NFTNL_EXPR_CT_DREG, *dreg);
            e
        }
        Expr::CtSet { key, sreg } => {
            let e = ExprObj::new(c"ct")?;
            e.u32(sys::NFTNL_EXPR_CT_KEY, *key);
            e.u32(sys::NFTNL_EXPR_CT_SREG, *sreg);
            e
        }
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => {
            let e = ExprObj::new(c"payload")?;
            e.u32(sys::NFTNL_EXPR_PAYLOAD_BASE, *base);
            e.u32(sys::NFTNL_EXPR_PAYLOAD_OFFSET, *offset);
            e.u32(sys::NFTNL_EXPR_PAYLOAD_LEN, *len);
            e.u32(sys::NFTNL_EXPR_PAYLOAD_DREG, *dreg);
            e
        }
        Expr::Bitwise {
            reg,
            mask,
            xor,
            boolean,
        } => {
            let e = ExprObj::new(c"bitwise")?;
            e.u32(sys::NFTNL_EXPR_BITWISE_SREG, *reg);
            e.u32(sys::NFTNL_EXPR_BITWISE_DREG, *reg);
            e.u32(sys::NFTNL_EXPR_BITWISE_LEN, len32(mask)?);
            e.data(sys::NFTNL_EXPR_BITWISE_MASK, mask)?;
            e.data(sys::NFTNL_EXPR_BITWISE_XOR, xor)?;
            if *boolean {
                e.u32(NFTNL_EXPR_BITWISE_OP, NFT_BITWISE_BOOL);
            }
            e
        }
        Expr::Cmp { op, reg, data } => {
            let e = ExprObj::new(c"cmp")?;
            e.u32(sys::NFTNL_EXPR_CMP_SREG, *reg);
            e.u32(sys::NFTNL_EXPR_CMP_OP, *op);
            e.data(sys::NFTNL_EXPR_CMP_DATA, data)?;
            e
        }
        Expr::Lookup {
            sreg,
            dreg,
            set,
            set_id,
            invert,
        } => {
            let e = ExprObj::new(c"lookup")?;
            e.u32(sys::NFTNL_EXPR_LOOKUP_SREG, *sreg);
            if let Some(dreg) = dreg {
                e.u32(sys::NFTNL_EXPR_LOOKUP_DREG, *dreg);
            }
            e.str(sys::NFTNL_EXPR_LOOKUP_SET, set)?;
            if let Some(id) = set_id {
                e.u32(sys::NFTNL_EXPR_LOOKUP_SET_ID, *id);
            }
            if *invert {
                e.u32(sys::NFTNL_EXPR_LOOKUP_FLAGS, NFT_LOOKUP_F_INV);
            }
            e
        }
        Expr::Verdict(code) => {
            let e = ExprObj::new(c"immediate")?;
            e.u32(sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32);
            e.u32(sys::NFTNL_EXPR_IMM_VERDICT, *code as u32);
            e
        }
        Expr::Jump(chain) => {
            let e = ExprObj::new(c"immediate")?;
            e.u32(sys::NFTNL_EXPR_IMM_DREG, libc::NFT_REG_VERDICT as u32);
            e.u32(sys::NFTNL_EXPR_IMM_VERDICT, libc::NFT_JUMP as u32);
            e.str(sys::NFTNL_EXPR_IMM_CHAIN, chain)?;
            e
        }
    })
}

impl Built {
    /// Writes the message at `buf`.
    ///
    /// # Safety
    /// `buf` must have room for `nftnl::nft_nlmsg_maxsize()` bytes.
    unsafe fn build(&self, buf: *mut c_void, seq: u32, family: u16) {
        let header = |kind: u16, flags: u16| {
            // SAFETY: the caller guarantees room for the largest message at `buf`.
            unsafe { sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), kind, family, flags, seq) }
        };
        // SAFETY: `header` returns the header just written at `buf`; each object is valid.
        unsafe {
            match self {
                Built::Table(t, kind, flags) => {
                    sys::nftnl_table_nlmsg_build_payload(header(*kind, *flags), t.ptr())
                }
                Built::Chain(c, kind, flags) => {
                    sys::nftnl_chain_nlmsg_build_payload(header(*kind, *flags), c.ptr())
                }
                Built::Set(s, kind, flags) => {
                    sys::nftnl_set_nlmsg_build_payload(header(*kind, *flags), s.ptr())
                }
                Built::Elements(s, kind, flags) => {
                    sys::nftnl_set_elems_nlmsg_build_payload(header(*kind, *flags), s.ptr())
                }
                Built::Rule(r, kind, flags) => {
                    sys::nftnl_rule_nlmsg_build_payload(header(*kind, *flags), r.ptr())
                }
            }
        }
    }
}

/// A built message with the `NFPROTO_*` family its header carries.
struct Framed(Built, u16);

// SAFETY: `build` makes no message whose size bound exceeds `nft_nlmsg_maxsize()` bytes, the
// room `Batch` gives every message.
unsafe impl NlMsg for Framed {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _: MsgType) {
        // libmnl before 1.0.5 leaves the padding after an attribute unwritten, and the batch
        // buffer is not zeroed: the first pass measures the message, the second writes it
        // again over zeros, so that no stale heap bytes go to the kernel.
        // SAFETY: `buf` has room for the largest message (the caller's promise); the header
        // read back is the one just written there, and `len` bytes of it are the message.
        unsafe {
            self.0.build(buf, seq, self.1);
            let len = buf.cast::<libc::nlmsghdr>().read_unaligned().nlmsg_len as usize;
            std::ptr::write_bytes(buf.cast::<u8>(), 0, len);
            self.0.build(buf, seq, self.1);
        }
    }
}

/// `SO_RCVBUFFORCE` and friends, absent from `libc` for this target.
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;
const NETLINK_CAP_ACK: libc::c_int = 10;

/// Replies are read into this; aligned for netlink headers.
#[repr(C, align(8))]
struct ReplyBuffer([u8; 1 << 16]);

/// A netfilter netlink socket: non-blocking (every reply to a batch is queued before `send`
/// returns) and with acknowledgements capped to the header of the message they answer.
pub(super) struct Socket {
    mnl: mnl::Socket,
    buffer: Box<ReplyBuffer>,
}

// SAFETY: the libmnl socket is a file descriptor and a port id with no thread affinity; all
// use goes through `&mut self` of the one owner.
unsafe impl Send for Socket {}

impl Socket {
    pub fn open() -> io::Result<Socket> {
        let mnl = mnl::Socket::new(mnl::Bus::Netfilter)?;
        let fd = mnl.as_raw_fd();
        set_option(fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, 1)?;
        // SAFETY: `fd` is the open socket owned by `mnl`.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above; only `O_NONBLOCK` is added.
        if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Socket {
            mnl,
            buffer: Box::new(ReplyBuffer([0; 1 << 16])),
        })
    }

    /// Makes room for a batch of `send` bytes and `replies` acknowledgements. The forced sizes
    /// need CAP_NET_ADMIN, which writing nf_tables needs anyway; the plain ones are the
    /// fallback.
    pub fn reserve(&self, send: usize, replies: usize) -> io::Result<()> {
        let fd = self.mnl.as_raw_fd();
        // An acknowledgement takes under 1 KiB of socket memory (measured: 3,540 fit in
        // 3.5 MiB); twice that leaves room for error replies.
        let recv = replies.saturating_mul(2048).max(1 << 18);
        for (forced, plain, size) in [
            (
                SO_SNDBUFFORCE,
                libc::SO_SNDBUF,
                send.saturating_add(1 << 16),
            ),
            (SO_RCVBUFFORCE, libc::SO_RCVBUF, recv),
        ] {
            let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
            if set_option(fd, libc::SOL_SOCKET, forced, size).is_err() {
                set_option(fd, libc::SOL_SOCKET, plain, size)?;
            }
        }
        Ok(())
    }

    /// The socket's netlink port id.
    pub fn port(&self) -> u32 {
        self.mnl.portid()
    }

    pub fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let sent = self.mnl.send(bytes)?;
        if sent == bytes.len() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "the kernel took {sent} of {} bytes",
                bytes.len()
            )))
        }
    }

    /// The next datagram of replies, or none when no more is queued.
    pub fn recv(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            match self.mnl.recv_raw(&mut self.buffer.0) {
                Ok(n) => return Ok(self.buffer.0.get(..n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Sets the receive buffer of another netlink socket (the notification monitor's) to `size`,
/// past the system's cap; needs CAP_NET_ADMIN.
pub(super) fn force_receive_buffer(fd: RawFd, size: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
    set_option(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, size)
}

fn set_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` lives across the call and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr};

    use ruleset::ir::{Element, Family, Set, SetKey, Table};
    use ruleset::Compiler;

    use super::*;

    /// Length of each object message in an encoded batch.
    fn lengths(bytes: &[u8]) -> Vec<usize> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([rest[4], rest[5]]);
            if kind != 16 && kind != 17 {
                out.push(len);
            }
            rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        }
        out
    }

    #[test]
    fn every_message_stays_within_its_size_bound() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../integration/examples/three-tier.yaml");
        let example = Compiler::new(crate::manifests::load(&path).unwrap(), "node-a")
            .table()
            .clone();
        let elements: BTreeSet<Element> = (0..20_000u32)
            .map(|n| {
                Element::Range(
                    Ipv4Addr::from(n << 8).into(),
                    Ipv4Addr::from((n << 8) + 9).into(),
                )
            })
            .chain([Element::Range(
                IpAddr::V4(Ipv4Addr::new(255, 0, 0, 0)),
                IpAddr::V4(Ipv4Addr::BROADCAST),
            )])
            .collect();
        let big = Table {
            name: "t".into(),
            sets: [(
                "s".to_string(),
                Set {
                    name: "s".into(),
                    key: SetKey::Addr(Family::V4),
                    interval: true,
                    comment: "c".into(),
                    elements,
                },
            )]
            .into(),
            ..Table::default()
        };
        for table in [example, big] {
            for message in crate::netlink::plan::replace(&table).unwrap() {
                let encoded = encode(std::iter::once(&message)).unwrap();
                let [len] = lengths(&encoded.bytes)[..] else {
                    panic!("one message expected for {}", message.object);
                };
                let bound = size_bound(&message.op);
                assert!(len <= bound, "{}: {len} > {bound}", message.object);
                assert!(bound <= nftnl::nft_nlmsg_maxsize() as usize);
            }
        }
    }
}
