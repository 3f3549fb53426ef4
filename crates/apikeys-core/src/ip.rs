//! The addresses a key may be used from.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The most networks one allowlist holds.
pub const MAX_ALLOWED_NETWORKS: usize = 100;

/// The networks a key may be used from: IPv4 and IPv6 CIDR blocks (`203.0.113.0/24`,
/// `2001:db8::/32`) or single addresses (`198.51.100.7`, the same as `/32`).
///
/// A key without an allowlist may be used from anywhere; a key with one is refused with
/// [`Error::IpNotAllowed`] from any other address, and from an unknown one, before any
/// rate limit or credit is counted. An IPv4 address that reaches a dual-stack listener as an
/// IPv4-mapped IPv6 address (`::ffff:203.0.113.7`) is matched as the IPv4 address it is.
///
/// ```
/// use apikeys_core::IpAllowlist;
///
/// # fn main() -> apikeys_core::Result<()> {
/// let office = IpAllowlist::parse(["203.0.113.0/24", "2001:db8::/32", "198.51.100.7"])?;
/// assert!(office.allows("203.0.113.77".parse().unwrap()));
/// assert!(office.allows("::ffff:203.0.113.77".parse().unwrap()));
/// assert!(!office.allows("198.51.100.8".parse().unwrap()));
/// assert!(IpAllowlist::parse(["10.1.2.3/8"]).is_err()); // host bits set: 10.0.0.0/8?
/// # Ok(())
/// # }
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IpAllowlist {
    /// Sorted, without duplicates, never empty.
    networks: Vec<IpNet>,
}

impl IpAllowlist {
    /// Parses and checks a list of networks.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `allowed_ips`) for an empty list, more than
    /// [`MAX_ALLOWED_NETWORKS`] entries, an entry that is neither an address nor a CIDR block,
    /// or a block with host bits set (`10.1.2.3/8`: write `10.0.0.0/8`). Duplicates are
    /// kept once.
    pub fn parse<I, S>(entries: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut networks = Vec::new();
        for (i, entry) in entries.into_iter().enumerate() {
            if i == MAX_ALLOWED_NETWORKS {
                return Err(Error::invalid_input(
                    "allowed_ips",
                    format!("at most {MAX_ALLOWED_NETWORKS} networks"),
                ));
            }
            networks.push(parse_network(entry.as_ref())?);
        }
        if networks.is_empty() {
            return Err(Error::invalid_input(
                "allowed_ips",
                "an allowlist needs at least one network (remove the allowlist to allow any address)",
            ));
        }
        networks.sort_unstable();
        networks.dedup();
        Ok(Self { networks })
    }

    /// Whether `ip` is inside one of the networks.
    #[must_use]
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.networks.iter().any(|n| n.contains(&ip))
    }

    /// The networks, sorted, each in its CIDR form (`203.0.113.7/32` for a single address).
    pub fn networks(&self) -> impl ExactSizeIterator<Item = String> + '_ {
        self.networks.iter().map(ToString::to_string)
    }

    /// Whether a network of the list is a whole address family (`0.0.0.0/0` or `::/0`).
    #[must_use]
    pub fn has_catch_all(&self) -> bool {
        self.networks.iter().any(|n| n.prefix_len() == 0)
    }

    /// How many networks the list holds (at least one).
    #[must_use]
    pub fn len(&self) -> usize {
        self.networks.len()
    }

    /// Always false: an allowlist holds at least one network.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }
}

/// One entry: an address or a block without host bits, in the standard library's strict
/// forms (no leading zeros, which some tools read as octal). An IPv4-mapped IPv6 block
/// (`::ffff:192.0.2.0/120`) becomes the IPv4 block it is, as addresses are matched. A
/// refusal never repeats what the caller sent (it may be anything); it may name the block
/// the entry parsed as.
fn parse_network(entry: &str) -> Result<IpNet> {
    let bad = || {
        Error::invalid_input(
            "allowed_ips",
            "each entry must be an IPv4 or IPv6 address or CIDR block, like 203.0.113.0/24",
        )
    };
    let entry = entry.trim();
    let (address, prefix) = match entry.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (entry, None),
    };
    let address: IpAddr = address.parse().map_err(|_| bad())?;
    let max = if address.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        // Digits only, no leading zero, at most the address's width.
        Some(p) if p == "0" || (!p.starts_with('0') && p.bytes().all(|b| b.is_ascii_digit())) => {
            p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(bad)?
        }
        Some(_) => return Err(bad()),
    };
    let net = match address {
        IpAddr::V6(v6) if prefix >= 96 && v6.to_ipv4_mapped().is_some() => {
            IpNet::new(address.to_canonical(), prefix - 96)
        }
        _ => IpNet::new(address, prefix),
    }
    .map_err(|_| bad())?;
    if net.trunc() != net {
        return Err(Error::invalid_input(
            "allowed_ips",
            format!("{net} has host bits set; the block is {}", net.trunc()),
        ));
    }
    Ok(net)
}

impl fmt::Debug for IpAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.networks.iter().map(ToString::to_string)).finish()
    }
}

impl fmt::Display for IpAllowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.networks.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}

impl Serialize for IpAllowlist {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_seq(self.networks())
    }
}

impl<'de> Deserialize<'de> for IpAllowlist {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let entries = Vec::<String>::deserialize(deserializer)?;
        IpAllowlist::parse(entries).map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "utoipa")]
impl utoipa::PartialSchema for IpAllowlist {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, SchemaType, Type};
        ArrayBuilder::new()
            .items(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .description(Some("An IPv4 or IPv6 address or CIDR block")),
            )
            .min_items(Some(1))
            .max_items(Some(MAX_ALLOWED_NETWORKS))
            .into()
    }
}

#[cfg(feature = "utoipa")]
impl utoipa::ToSchema for IpAllowlist {}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn matches_v4_v6_and_mapped_addresses() {
        let list = IpAllowlist::parse(["10.0.0.0/8", "2001:db8::/32", " 192.0.2.1 "]).unwrap();
        assert!(list.allows(ip("10.255.0.1")));
        assert!(list.allows(ip("::ffff:10.1.1.1")));
        assert!(list.allows(ip("2001:db8:ffff::1")));
        assert!(list.allows(ip("192.0.2.1")));
        assert!(!list.allows(ip("192.0.2.2")));
        assert!(!list.allows(ip("11.0.0.1")));
        assert!(!list.allows(ip("2001:db9::1")));
        // An IPv4 block never matches an IPv6 address outside the mapped range.
        assert!(!list.allows(ip("::10.0.0.1")));
        let mapped = IpAllowlist::parse(["::ffff:192.0.2.9", "::ffff:198.51.100.0/120"]).unwrap();
        assert!(mapped.allows(ip("192.0.2.9")));
        assert!(mapped.allows(ip("198.51.100.77")));
        assert!(mapped.allows(ip("::ffff:198.51.100.77")));
        assert_eq!(mapped.networks().collect::<Vec<_>>(), ["192.0.2.9/32", "198.51.100.0/24"]);
        let everything = IpAllowlist::parse(["0.0.0.0/0", "::/0"]).unwrap();
        assert!(everything.allows(ip("203.0.113.1")) && everything.allows(ip("2001:db8::1")));
        assert!(everything.has_catch_all() && !list.has_catch_all());
    }

    #[test]
    fn refuses_bad_entries_without_repeating_them() {
        let field = |r: Result<IpAllowlist>| match r {
            Err(Error::InvalidInput { field, reason }) => (field, reason.into_owned()),
            other => panic!("{other:?}"),
        };
        let none: [&str; 0] = [];
        assert_eq!(field(IpAllowlist::parse(none)).0, "allowed_ips");
        let (f, why) = field(IpAllowlist::parse(["10.0.0.0/8", "sk_live_secretish"]));
        assert_eq!(f, "allowed_ips");
        assert!(!why.contains("secretish"), "{why}");
        for bad in [
            "10.0.0.0/33",
            "10.0.0/8",
            "",
            "::/129",
            "1.2.3.4/-1",
            "010.0.0.0/8",
            "10.0.0.1/08",
            "10.0.0.0/+8",
            "10.0.0.0/",
            "fe80::1%eth0",
            "10.0.0.0/8/8",
        ] {
            assert_eq!(field(IpAllowlist::parse([bad])).0, "allowed_ips", "{bad}");
        }
        let (_, why) = field(IpAllowlist::parse(["10.1.2.3/8"]));
        assert!(why.contains("10.0.0.0/8"), "{why}");
        let many: Vec<String> =
            (0..=MAX_ALLOWED_NETWORKS).map(|i| format!("10.0.{i}.0/24")).collect();
        assert!(IpAllowlist::parse(&many).is_err());
        assert!(IpAllowlist::parse(&many[..MAX_ALLOWED_NETWORKS]).is_ok());
    }

    #[test]
    fn sorted_deduplicated_and_round_trips_through_serde() {
        let list = IpAllowlist::parse(["192.0.2.0/24", "10.0.0.0/8", "192.0.2.0/24"]).unwrap();
        assert_eq!(list.len(), 2);
        let json = serde_json::to_string(&list).unwrap();
        assert_eq!(json, r#"["10.0.0.0/8","192.0.2.0/24"]"#);
        assert_eq!(serde_json::from_str::<IpAllowlist>(&json).unwrap(), list);
        assert!(serde_json::from_str::<IpAllowlist>("[]").is_err());
        assert!(serde_json::from_str::<IpAllowlist>(r#"["nope"]"#).is_err());
    }
}
