//! The subject of an X.509 certificate as an RFC 4514 string
//! (`CN=host1,O=Example`), the form qemu's TLS authorization lists and
//! `openssl x509 -noout -subject -nameopt RFC2253` print. Only the subject
//! is read; the certificate was verified by rustls before it gets here, and
//! anything malformed is `None`, never a panic.

/// The subject of the DER certificate `cert`.
pub(crate) fn subject(cert: &[u8]) -> Option<String> {
    let (tag, certificate, _) = tlv(cert)?;
    expect(tag, 0x30)?;
    let (tag, tbs, _) = tlv(certificate)?;
    expect(tag, 0x30)?;
    let mut rest = tbs;
    // [0] EXPLICIT version, absent in v1 certificates.
    let (tag, _, after) = tlv(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    // serialNumber, signature, issuer, validity.
    for want in [0x02, 0x30, 0x30, 0x30] {
        let (tag, _, after) = tlv(rest)?;
        expect(tag, want)?;
        rest = after;
    }
    let (tag, name, _) = tlv(rest)?;
    expect(tag, 0x30)?;
    name_string(name)
}

fn expect(tag: u8, want: u8) -> Option<()> {
    (tag == want).then_some(())
}

/// One DER element: (tag, contents, the bytes after it). Single-byte tags
/// and definite lengths only, as DER requires.
fn tlv(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *d.first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let first = *d.get(1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for &b in d.get(2..2 + n)? {
            len = (len << 8) | usize::from(b);
        }
        (len, 2 + n)
    };
    let end = header.checked_add(len)?;
    Some((tag, d.get(header..end)?, d.get(end..)?))
}

/// RDNSequence → RFC 4514: the last RDN first, RDNs joined by `,`, the
/// attributes of a multi-valued RDN by `+`.
fn name_string(mut name: &[u8]) -> Option<String> {
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (tag, set, after) = tlv(name)?;
        expect(tag, 0x31)?;
        name = after;
        let mut attrs = Vec::new();
        let mut set = set;
        while !set.is_empty() {
            let (tag, atv, after) = tlv(set)?;
            expect(tag, 0x30)?;
            set = after;
            let (tag, oid, value) = tlv(atv)?;
            expect(tag, 0x06)?;
            attrs.push(attribute(oid, value)?);
        }
        rdns.push(attrs.join("+"));
    }
    rdns.reverse();
    Some(rdns.join(","))
}

/// `TYPE=value` for one AttributeTypeAndValue (`value_der` is the whole
/// DER of the value).
fn attribute(oid: &[u8], value_der: &[u8]) -> Option<String> {
    let dotted = oid_string(oid)?;
    let short = match dotted.as_str() {
        "2.5.4.3" => Some("CN"),
        "2.5.4.6" => Some("C"),
        "2.5.4.7" => Some("L"),
        "2.5.4.8" => Some("ST"),
        "2.5.4.9" => Some("STREET"),
        "2.5.4.10" => Some("O"),
        "2.5.4.11" => Some("OU"),
        "0.9.2342.19200300.100.1.1" => Some("UID"),
        "0.9.2342.19200300.100.1.25" => Some("DC"),
        // As GnuTLS (and so qemu) prints it; openssl says emailAddress.
        "1.2.840.113549.1.9.1" => Some("EMAIL"),
        _ => None,
    };
    let (tag, contents, rest) = tlv(value_der)?;
    if !rest.is_empty() {
        return None;
    }
    let text = match (short, tag) {
        (Some(_), 0x0c | 0x13 | 0x16) => Some(std::str::from_utf8(contents).ok()?.to_string()),
        // TeletexString: taken as Latin-1, as most software does.
        (Some(_), 0x14) => Some(contents.iter().map(|&b| char::from(b)).collect()),
        // BMPString: UTF-16BE.
        (Some(_), 0x1e) if contents.len() % 2 == 0 => {
            let units: Vec<u16> = contents
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            Some(String::from_utf16(&units).ok()?)
        }
        // UniversalString: UTF-32BE.
        (Some(_), 0x1c) if contents.len() % 4 == 0 => Some(
            contents
                .chunks_exact(4)
                .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
                .collect::<Option<String>>()?,
        ),
        _ => None,
    };
    Some(match (short, text) {
        (Some(name), Some(text)) => format!("{name}={}", escape(&text)),
        // RFC 4514: an unknown type or encoding is the dotted OID and the
        // value's DER in hex.
        _ => {
            let hex: String = value_der.iter().map(|b| format!("{b:02x}")).collect();
            format!("{dotted}=#{hex}")
        }
    })
}

fn oid_string(oid: &[u8]) -> Option<String> {
    let mut arcs: Vec<u64> = Vec::new();
    let mut v: u64 = 0;
    for (i, &b) in oid.iter().enumerate() {
        if v > u64::MAX >> 7 {
            return None;
        }
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            if arcs.is_empty() {
                let first = (v / 40).min(2);
                arcs.push(first);
                arcs.push(v - first * 40);
            } else {
                arcs.push(v);
            }
            v = 0;
        } else if i + 1 == oid.len() {
            return None;
        }
    }
    if arcs.is_empty() {
        return None;
    }
    Some(
        arcs.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// RFC 4514 section 2.4 escaping.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut d = vec![tag];
        if contents.len() < 0x80 {
            d.push(contents.len() as u8);
        } else {
            d.push(0x82);
            d.extend_from_slice(&(contents.len() as u16).to_be_bytes());
        }
        d.extend_from_slice(contents);
        d
    }

    fn atv(oid: &[u8], tag: u8, v: &[u8]) -> Vec<u8> {
        der(0x30, &[der(0x06, oid), der(tag, v)].concat())
    }

    fn cert_with_subject(subject: &[u8]) -> Vec<u8> {
        let tbs = [
            der(0xa0, &der(0x02, &[2])),
            der(0x02, &[1, 2, 3]),
            der(0x30, &[]),
            der(0x30, &der(0x31, &atv(&[0x55, 4, 3], 0x0c, b"Issuer CA"))),
            der(0x30, &[]),
            der(0x30, subject),
        ]
        .concat();
        der(
            0x30,
            &[der(0x30, &tbs), der(0x30, &[]), der(0x03, &[0])].concat(),
        )
    }

    #[test]
    fn subject_in_rfc4514_order_with_escapes() {
        let name = [
            der(0x31, &atv(&[0x55, 4, 6], 0x13, b"GB")),
            der(0x31, &atv(&[0x55, 4, 10], 0x0c, b"Acme, Inc.")),
            der(
                0x31,
                &[
                    atv(&[0x55, 4, 11], 0x0c, b"Storage"),
                    atv(&[0x55, 4, 11], 0x14, b"Caf\xe9"),
                ]
                .concat(),
            ),
            der(0x31, &atv(&[0x55, 4, 3], 0x0c, b" #vm-host+1 ")),
        ]
        .concat();
        assert_eq!(
            subject(&cert_with_subject(&name)).as_deref(),
            Some("CN=\\ #vm-host\\+1\\ ,OU=Storage+OU=Café,O=Acme\\, Inc.,C=GB")
        );
        // An unknown attribute: dotted OID and the value's DER in hex.
        let odd = der(0x31, &atv(&[0x2a, 0x03, 0x04], 0x0c, b"x"));
        assert_eq!(
            subject(&cert_with_subject(&odd)).as_deref(),
            Some("1.2.3.4=#0c0178")
        );
    }

    #[test]
    fn malformed_certificates_are_none() {
        let good = cert_with_subject(&der(0x31, &atv(&[0x55, 4, 3], 0x0c, b"a")));
        assert_eq!(subject(&good).as_deref(), Some("CN=a"));
        for n in 0..good.len() {
            // Every truncation is None, never a panic.
            assert_eq!(subject(&good[..n]), None, "truncated at {n}");
        }
        assert_eq!(subject(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(subject(&[0x1f, 0x01, 0x00]), None);
        let bad_utf8 = cert_with_subject(&der(0x31, &atv(&[0x55, 4, 3], 0x0c, b"\xff")));
        assert_eq!(subject(&bad_utf8), None);
    }
}
