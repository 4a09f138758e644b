//! Netfilter rule management for protected machines. (in progress)
