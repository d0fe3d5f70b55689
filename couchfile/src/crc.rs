//! The two checksums of the format.

/// Which checksum a file's chunks carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CrcKind {
    /// CRC-32 (IEEE, as zlib), used by disk version 11.
    Crc32,
    /// CRC-32C (Castagnoli), used by disk versions 12 to 14. Computed with the
    /// CPU's CRC instruction where it has one.
    Crc32c,
}

impl CrcKind {
    /// The checksum a file of `disk_version` uses.
    pub fn for_version(disk_version: u8) -> Self {
        if disk_version <= 11 {
            CrcKind::Crc32
        } else {
            CrcKind::Crc32c
        }
    }

    /// The checksum of `data`.
    pub fn checksum(self, data: &[u8]) -> u32 {
        match self {
            CrcKind::Crc32 => crc32fast::hash(data),
            CrcKind::Crc32c => crc32c::crc32c(data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_values() {
        assert_eq!(CrcKind::Crc32c.checksum(b"123456789"), 0xE306_9283);
        assert_eq!(CrcKind::Crc32.checksum(b"123456789"), 0xCBF4_3926);
        assert_eq!(CrcKind::for_version(11), CrcKind::Crc32);
        assert_eq!(CrcKind::for_version(12), CrcKind::Crc32c);
        assert_eq!(CrcKind::for_version(14), CrcKind::Crc32c);
    }
}
