//! The address a request came from, for keys with an IP allowlist: the connection's peer,
//! or, behind proxies the host trusts, the address they forwarded.

use std::net::IpAddr;

use apikeys_core::{Error, IpAllowlist};
use http::HeaderMap;
use http::header::{FORWARDED, HeaderName};

/// The header trusted proxies put the client's address in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (what most load balancers send).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for="[2001:db8::1]:4711"`.
    Forwarded,
}

/// The proxies whose forwarding header is believed, and which header that is.
///
/// Without it (the default of every guard), a request's address is its connection's peer
/// and forwarding headers are ignored: anyone can send `X-Forwarded-For`. With it, a request
/// whose peer is one of these networks has its address read from the header, right to left:
/// the first entry that is not itself a trusted proxy is the client. A header entry that is
/// not an address (`unknown`, an obfuscated `_name`, garbage) makes the address unknown,
/// and a key with an allowlist is then refused rather than judged by a guess.
///
/// ```
/// use apikeys_core::IpAllowlist;
/// use apikeys_http::{ForwardedHeader, TrustedProxies};
/// use http::HeaderMap;
///
/// # fn main() -> apikeys_core::Result<()> {
/// let proxies = TrustedProxies::new(IpAllowlist::parse(["10.0.0.0/8"])?, ForwardedHeader::XForwardedFor)?;
/// let mut headers = HeaderMap::new();
/// headers.insert("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.7".parse().unwrap());
/// // Through two of our proxies: the client is the first untrusted entry from the right.
/// let client = proxies.client_ip(Some("10.0.0.2".parse().unwrap()), &headers);
/// assert_eq!(client, Some("203.0.113.9".parse().unwrap()));
/// // Straight from the internet: the header is the sender's own claim and is ignored.
/// let direct = proxies.client_ip(Some("198.51.100.1".parse().unwrap()), &headers);
/// assert_eq!(direct, Some("198.51.100.1".parse().unwrap()));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: IpAllowlist,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Believe `header` on requests whose peer is in `networks`.
    ///
    /// The header must be one the proxies set or append to on every request: a header they
    /// pass through untouched (AWS's ALB does so with `Forwarded`) is the client's own
    /// claim. Name the proxies' own addresses, as narrowly as the network allows: any other
    /// machine inside these networks can claim any address too.
    ///
    /// # Errors
    /// [`Error::Configuration`] for a network that is a whole address family (`0.0.0.0/0`,
    /// `::/0`): every client would be believed.
    pub fn new(networks: IpAllowlist, header: ForwardedHeader) -> Result<Self, Error> {
        if networks.has_catch_all() {
            return Err(Error::configuration(
                "trusted proxies cannot include 0.0.0.0/0 or ::/0: every client could claim any address",
            ));
        }
        Ok(Self { networks, header })
    }

    /// The client's address of a request from `peer` (`None`: the connection's address is
    /// unknown, and so is the client's) carrying `headers`.
    #[must_use]
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let values = headers.get_all(self.header_name()).into_iter().map(|v| v.as_bytes());
        self.client_ip_from(peer, values)
    }

    /// The header the proxies forward the client's address in: `x-forwarded-for` or
    /// `forwarded` (lowercase, as HTTP/2 sends it).
    #[must_use]
    pub fn header_name(&self) -> HeaderName {
        match self.header {
            ForwardedHeader::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
            ForwardedHeader::Forwarded => FORWARDED,
        }
    }

    /// [`client_ip`](Self::client_ip) for a framework without `http` types: `values` are
    /// the raw values of the [`header_name`](Self::header_name) header, in the order sent.
    #[must_use]
    pub fn client_ip_from<'a>(
        &self,
        peer: Option<IpAddr>,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Option<IpAddr> {
        let peer = peer?.to_canonical();
        if !self.networks.allows(peer) {
            return Some(peer);
        }
        let mut entries = Vec::new();
        for value in values {
            // Visible ASCII only, as `HeaderValue::to_str` reads it.
            let visible = value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
            let value = std::str::from_utf8(value).ok().filter(|_| visible)?;
            for entry in value.split(',') {
                let entry = entry.trim();
                let address = match self.header {
                    ForwardedHeader::XForwardedFor => parse_address(entry),
                    ForwardedHeader::Forwarded => forwarded_for(entry).and_then(parse_address),
                };
                entries.push(address);
            }
        }
        // A proxy that forwarded nothing (its own request, a health check): the peer.
        let mut client = peer;
        for entry in entries.into_iter().rev() {
            client = entry?.to_canonical();
            if !self.networks.allows(client) {
                break;
            }
        }
        Some(client)
    }
}

/// The address a guard judges a request's key by: the peer, or what `trusted` proxies
/// forwarded (see [`TrustedProxies`]).
#[must_use]
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: Option<&TrustedProxies>,
) -> Option<IpAddr> {
    match trusted {
        Some(proxies) => proxies.client_ip(peer, headers),
        None => peer.map(|p| p.to_canonical()),
    }
}

/// The `for=` value of one `Forwarded` element, unquoted.
fn forwarded_for(element: &str) -> Option<&str> {
    element.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        name.trim().eq_ignore_ascii_case("for").then(|| value.trim().trim_matches('"'))
    })
}

/// An address as proxies write it: `203.0.113.9`, `2001:db8::1`, `[2001:db8::1]`,
/// `[2001:db8::1]:4711` or `203.0.113.9:4711`.
fn parse_address(text: &str) -> Option<IpAddr> {
    if let Ok(ip) = text.parse() {
        return Some(ip);
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.starts_with(':')) {
            return None;
        }
        return inside.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (host, port) = text.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(name: &str, values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    fn proxies(header: ForwardedHeader) -> TrustedProxies {
        TrustedProxies::new(IpAllowlist::parse(["10.0.0.0/8", "fd00::/8"]).unwrap(), header)
            .unwrap()
    }

    #[test]
    fn a_whole_address_family_is_never_trusted() {
        for all in ["0.0.0.0/0", "::/0"] {
            let networks = IpAllowlist::parse(["10.0.0.0/8", all]).unwrap();
            let refused = TrustedProxies::new(networks, ForwardedHeader::XForwardedFor);
            assert!(matches!(refused, Err(Error::Configuration { .. })), "{all}");
        }
    }

    #[test]
    fn without_trusted_proxies_the_peer_and_never_the_header() {
        let h = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(client_ip(Some(ip("198.51.100.1")), &h, None), Some(ip("198.51.100.1")));
        assert_eq!(client_ip(Some(ip("::ffff:198.51.100.1")), &h, None), Some(ip("198.51.100.1")));
        assert_eq!(client_ip(None, &h, None), None);
        assert_eq!(proxies(ForwardedHeader::XForwardedFor).client_ip(None, &h), None);
    }

    #[test]
    fn x_forwarded_for_right_to_left_past_trusted_proxies() {
        let p = proxies(ForwardedHeader::XForwardedFor);
        let peer = Some(ip("10.1.1.1"));
        // Split over two header lines, spoofed entry on the left.
        let h = headers("x-forwarded-for", &["6.6.6.6, 203.0.113.9", "10.2.2.2"]);
        assert_eq!(p.client_ip(peer, &h), Some(ip("203.0.113.9")));
        // From an untrusted peer the header is ignored.
        assert_eq!(p.client_ip(Some(ip("198.51.100.1")), &h), Some(ip("198.51.100.1")));
        // No header from a trusted proxy: the proxy itself.
        assert_eq!(p.client_ip(peer, &HeaderMap::new()), peer);
        // Only trusted entries: the leftmost.
        let internal = headers("x-forwarded-for", &["10.9.9.9, 10.2.2.2"]);
        assert_eq!(p.client_ip(peer, &internal), Some(ip("10.9.9.9")));
        // Garbage where the client should be: unknown, never a guess.
        for bad in ["unknown, 10.2.2.2", "203.0.113.9, nonsense", "203.0.113.9,,"] {
            assert_eq!(p.client_ip(peer, &headers("x-forwarded-for", &[bad])), None, "{bad}");
        }
        // Garbage to the left of the client does not matter.
        let spoof = headers("x-forwarded-for", &["<script>, 203.0.113.9"]);
        assert_eq!(p.client_ip(peer, &spoof), Some(ip("203.0.113.9")));
        // IPv6 and ports.
        let v6 = headers("x-forwarded-for", &["[2001:db8::5]:4711, fd00::1"]);
        assert_eq!(p.client_ip(Some(ip("fd00::2")), &v6), Some(ip("2001:db8::5")));
        let port = headers("x-forwarded-for", &["203.0.113.9:5555"]);
        assert_eq!(p.client_ip(peer, &port), Some(ip("203.0.113.9")));
    }

    #[test]
    fn rfc_7239_forwarded() {
        let p = proxies(ForwardedHeader::Forwarded);
        let peer = Some(ip("10.1.1.1"));
        let h = headers(
            "forwarded",
            &[
                "for=6.6.6.6, for=\"[2001:db8:cafe::17]:4711\";proto=https",
                "For=10.3.3.3;by=10.1.1.1",
            ],
        );
        assert_eq!(p.client_ip(peer, &h), Some(ip("2001:db8:cafe::17")));
        let v4 = headers("forwarded", &["proto=http;for=\"203.0.113.43:47011\""]);
        assert_eq!(p.client_ip(peer, &v4), Some(ip("203.0.113.43")));
        for hidden in ["for=unknown", "for=_hidden", "proto=https"] {
            assert_eq!(p.client_ip(peer, &headers("forwarded", &[hidden])), None, "{hidden}");
        }
        // X-Forwarded-For is not read when Forwarded is the configured header.
        let xff = headers("x-forwarded-for", &["203.0.113.9"]);
        assert_eq!(p.client_ip(peer, &xff), peer);
    }
}
