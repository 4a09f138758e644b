//! NFQUEUE netlink driver. (in progress)
