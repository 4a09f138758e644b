//! Finding the guest RAM pages written since the last look: the `PAGEMAP_SCAN`
//! ioctl on `/proc/PID/pagemap` (Linux ≥ 6.7), run by the agent from outside QEMU.
//!
//! The pages must belong to a mapping that QEMU's own process registered with a
//! userfaultfd in write-protect async mode (the preload shim, `shim/src/lib.rs`).
//! Then every page is in one of two states: *protected* (not written since it was
//! last protected) or *written* (a write lifted the protection, without a fault
//! message: async mode). One scan with `PM_SCAN_WP_MATCHING` reports the written
//! pages **and** protects them again, atomically per page table, so a write that
//! races with the scan is either reported now or leaves the page written for the
//! next scan: no write is lost between two scans. The agent scans only while the
//! guest is stopped, so the reported set is exactly the pages written in the epoch
//! (plus pages rewritten with the same bytes, which a memcmp would not see).
//!
//! `PM_SCAN_CHECK_WPASYNC` makes the kernel refuse (`EPERM`) a scan that meets a
//! page *not* registered in WP-async mode: a guest that runs untracked (no shim,
//! wrong file) is an error here, never an empty dirty set.
//!
//! Bounds: the region buffer is fixed ([`MAX_REGIONS_PER_CALL`] regions); a scan
//! with more dirty runs loops, continuing from the kernel's `walk_end`.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::Path;

// --- ABI (include/uapi/linux/fs.h) -----------------------------------------
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Category: the page was written since it was last write-protected.
const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

/// Regions one ioctl call may return (24 bytes each: a 48 KiB buffer).
pub const MAX_REGIONS_PER_CALL: usize = 2048;

/// What a scan does to the pages it reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rearm {
    /// Write-protect the reported pages again (the epoch capture).
    Yes,
    /// Only look (start-up check that the range is tracked).
    No,
}

/// `PAGEMAP_SCAN` on one process.
pub struct PagemapScanner {
    pagemap: File,
    regions: Vec<PageRegion>,
}

impl PagemapScanner {
    /// Opens `/proc/<pid>/pagemap` (needs ptrace-read access to `pid`: root or the same user).
    pub fn open(pid: u32) -> io::Result<Self> {
        let path = format!("/proc/{pid}/pagemap");
        let pagemap =
            File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
        Ok(PagemapScanner {
            pagemap,
            regions: vec![PageRegion::default(); MAX_REGIONS_PER_CALL],
        })
    }

    /// Appends to `out` the written pages of `range` (virtual addresses of the
    /// scanned process, page aligned) as byte ranges **relative to
    /// `range.start`**, merged and ascending; with [`Rearm::Yes`] they are
    /// write-protected again. Fails with `EPERM` if any page of `range` is not
    /// registered for WP-async tracking.
    pub fn scan(
        &mut self,
        range: Range<u64>,
        rearm: Rearm,
        out: &mut Vec<Range<u64>>,
    ) -> io::Result<()> {
        let mut flags = PM_SCAN_CHECK_WPASYNC;
        if rearm == Rearm::Yes {
            flags |= PM_SCAN_WP_MATCHING;
        }
        let mut at = range.start;
        while at < range.end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: at,
                end: range.end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            // SAFETY: `arg` and the region buffer it points to are valid for the call;
            // the kernel writes at most `vec_len` regions.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
            if n < 0 {
                let e = io::Error::last_os_error();
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (a page is not tracked by userfaultfd WP-async: is the shim preloaded for this RAM file?)"
                } else {
                    ""
                };
                return Err(io::Error::new(
                    e.kind(),
                    format!("PAGEMAP_SCAN {:#x}..{:#x}: {e}{hint}", at, range.end),
                ));
            }
            for r in &self.regions[..n as usize] {
                let rel = r.start - range.start..r.end - range.start;
                match out.last_mut() {
                    Some(last) if last.end == rel.start => last.end = rel.end,
                    _ => out.push(rel),
                }
            }
            if arg.walk_end <= at {
                return Err(io::Error::other(format!(
                    "PAGEMAP_SCAN made no progress at {at:#x}"
                )));
            }
            at = arg.walk_end;
        }
        Ok(())
    }
}

/// One mapping of `/proc/PID/maps` backed by a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMapping {
    pub range: Range<u64>,
    pub shared: bool,
    pub inode: u64,
    pub path: String,
}

/// The mappings of `maps` (the text of `/proc/PID/maps`) whose inode is `inode`.
pub fn mappings_of_inode(maps: &str, inode: u64) -> Vec<FileMapping> {
    let mut found = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_ascii_whitespace();
        let (Some(addrs), Some(perms), Some(_off), Some(_dev), Some(ino)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Ok(ino) = ino.parse::<u64>() else {
            continue;
        };
        if ino != inode {
            continue;
        }
        let Some((a, b)) = addrs.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        found.push(FileMapping {
            range: a..b,
            shared: perms.as_bytes().get(3) == Some(&b's'),
            inode: ino,
            path: f.collect::<Vec<_>>().join(" "),
        });
    }
    found
}

/// The address range of `pid`'s one shared mapping of `ram_file` (QEMU's guest
/// RAM). Adjacent mappings of the file are merged; anything else is an error.
pub fn find_ram_mapping(pid: u32, ram_file: &Path) -> anyhow::Result<Range<u64>> {
    use anyhow::Context as _;
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(ram_file)
        .with_context(|| format!("stat RAM file {}", ram_file.display()))?
        .ino();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("read /proc/{pid}/maps"))?;
    let mut maps = mappings_of_inode(&maps, inode);
    maps.retain(|m| m.shared);
    let Some(first) = maps.first() else {
        anyhow::bail!(
            "process {pid} has no shared mapping of {} (inode {inode})",
            ram_file.display()
        );
    };
    let mut range = first.range.clone();
    for m in &maps[1..] {
        anyhow::ensure!(
            m.range.start == range.end,
            "process {pid} maps {} more than once ({:#x}.. and {:#x}..): which is the guest RAM?",
            ram_file.display(),
            range.start,
            m.range.start
        );
        range.end = m.range.end;
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_number_matches_the_kernel_header() {
        // From <linux/fs.h> on Linux 6.18: PAGEMAP_SCAN == 0xc0606610.
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn maps_lines_are_parsed_and_filtered_by_inode() {
        let maps = "\
7f0000000000-7f0010000000 rw-s 00000000 00:1a 4242                       /dev/shm/pc ram (deleted)
7f0010000000-7f0010001000 ---p 00000000 00:00 0
55d000000000-55d000001000 r-xp 00000000 08:01 4242                       /other
garbage line
";
        let m = mappings_of_inode(maps, 4242);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].range, 0x7f00_0000_0000..0x7f00_1000_0000);
        assert!(m[0].shared);
        assert_eq!(m[0].path, "/dev/shm/pc ram (deleted)");
        assert!(!m[1].shared);
    }
}
