//! Which architectures may run the kernel tagger.
//!
//! The program reads a machine's options area under a sequence lock that the
//! agent writes (see [`super::prog`], "Memory ordering"): read the sequence
//! word, read the area, read the word again, and use the area only if the word
//! was even and unchanged. The program issues no read barrier between those
//! loads; that is correct only where the CPU never reorders a load with another
//! load, as x86-64 (total store order) guarantees. On a weakly ordered CPU
//! (aarch64, riscv64, ...) the area could be read before the first sequence
//! word and a torn vector tagged onto a packet: a receiver would then merge a
//! dependency that was never issued, or miss one that was.
//!
//! So [`KernelTagger::load`](super::KernelTagger::load) refuses every other
//! architecture; the agent then warns and sends cross-host packets through the
//! NFQUEUE tag queue (same guarantees, slower), as for any other load failure.

/// Why the kernel tagger cannot run on this machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// The CPU may reorder loads with loads: the sequence lock would need read
    /// barriers the program does not have.
    #[error(
        "the kernel tagger's sequence lock relies on x86-64 load ordering; \
         this machine is {arch}"
    )]
    Arch {
        /// `std::env::consts::ARCH` of the running binary.
        arch: String,
    },
}

/// Whether the kernel tagger may run on architecture `arch` (a value of
/// `std::env::consts::ARCH`): only on `x86_64`.
pub fn kernel_tagger_supported(arch: &str) -> Result<(), Unsupported> {
    match arch {
        "x86_64" => Ok(()),
        other => Err(Unsupported::Arch {
            arch: other.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_x86_64_runs_the_kernel_tagger() {
        assert_eq!(kernel_tagger_supported("x86_64"), Ok(()));
        for arch in ["aarch64", "arm", "riscv64", "powerpc64", "s390x", "x86", ""] {
            let e = kernel_tagger_supported(arch).expect_err(arch);
            assert_eq!(
                e,
                Unsupported::Arch {
                    arch: arch.to_owned()
                }
            );
            assert!(e.to_string().contains("x86-64 load ordering"), "{e}");
        }
    }

    #[test]
    fn this_build_decides_as_its_architecture_says() {
        let here = kernel_tagger_supported(std::env::consts::ARCH);
        assert_eq!(here.is_ok(), cfg!(target_arch = "x86_64"), "{here:?}");
    }
}
