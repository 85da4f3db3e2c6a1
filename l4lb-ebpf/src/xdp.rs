//! The XDP access filter. For an IPv4 or IPv6 packet carrying TCP or UDP, it looks up
//! (protocol, destination port, source address) in an LPM trie the daemon fills from
//! the listeners' `access` rules, compiled so that the longest matching prefix gives
//! nginx's first-match answer; a `deny` drops the packet. Anything else passes: other
//! protocols, IPv6 with extension headers, fragments after the first, short frames.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{LpmTrie, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use l4lb_ebpf::{AccessKey4, AccessKey6, ACCESS_DENY, ACCESS_KEY_HEAD_BITS, ACCESS_MAX_ENTRIES};

#[map(name = "L4LB_ACCESS4")]
static ACCESS4: LpmTrie<AccessKey4, u8> = LpmTrie::with_max_entries(ACCESS_MAX_ENTRIES, 0);

#[map(name = "L4LB_ACCESS6")]
static ACCESS6: LpmTrie<AccessKey6, u8> = LpmTrie::with_max_entries(ACCESS_MAX_ENTRIES, 0);

#[map(name = "L4LB_XDP_DROPS")]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

#[xdp]
pub fn l4lb_xdp_access(ctx: XdpContext) -> u32 {
    if denied(&ctx).unwrap_or(false) {
        if let Some(n) = DROPS.get_ptr_mut(0) {
            // SAFETY: a per-CPU slot, only this CPU writes it.
            unsafe { *n += 1 };
        }
        XDP_DROP
    } else {
        XDP_PASS
    }
}

/// `len` bytes at `offset` of the frame, if the frame holds them.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, offset: usize) -> Option<[u8; N]> {
    let start = ctx.data() + offset;
    if start + N > ctx.data_end() {
        return None;
    }
    // SAFETY: the range lies inside the frame, as just checked for the verifier.
    Some(unsafe { core::ptr::read_unaligned(start as *const [u8; N]) })
}

#[inline(always)]
fn denied(ctx: &XdpContext) -> Option<bool> {
    let ether_type = u16::from_be_bytes(bytes::<2>(ctx, 12)?);
    match ether_type {
        ETH_P_IP => {
            let [version_ihl] = bytes::<1>(ctx, ETH_HLEN)?;
            let ihl = usize::from(version_ihl & 0x0f) * 4;
            let frag = u16::from_be_bytes(bytes::<2>(ctx, ETH_HLEN + 6)?);
            // Later fragments carry no ports; the first one decides.
            if ihl < 20 || frag & 0x1fff != 0 {
                return Some(false);
            }
            let [proto] = bytes::<1>(ctx, ETH_HLEN + 9)?;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return Some(false);
            }
            let addr = bytes::<4>(ctx, ETH_HLEN + 12)?;
            let port = bytes::<2>(ctx, ETH_HLEN + ihl + 2)?;
            let key = Key::new(ACCESS_KEY_HEAD_BITS + 32, AccessKey4 { proto, port, addr });
            Some(ACCESS4.get(&key).is_some_and(|v| *v == ACCESS_DENY))
        }
        ETH_P_IPV6 => {
            let [proto] = bytes::<1>(ctx, ETH_HLEN + 6)?;
            if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
                return Some(false);
            }
            let addr = bytes::<16>(ctx, ETH_HLEN + 8)?;
            let port = bytes::<2>(ctx, ETH_HLEN + 40 + 2)?;
            let key = Key::new(ACCESS_KEY_HEAD_BITS + 128, AccessKey6 { proto, port, addr });
            Some(ACCESS6.get(&key).is_some_and(|v| *v == ACCESS_DENY))
        }
        _ => Some(false),
    }
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
