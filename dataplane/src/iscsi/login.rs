//! Login: the text-key negotiation of RFC 7143 §6 and §13 and the login stage machine of §6.3,
//! including CHAP (one-way and mutual, MD5 only).
//!
//! [`Negotiation`] is pure: the connection feeds it each complete Login Request (header plus
//! the keys of all its continuation PDUs) and sends back what [`Negotiation::step`] returns. It
//! never sees a socket, so every rule is unit-tested and the key parser is fuzzed.
//!
//! Negotiation rules in force (§13): list keys (digests, AuthMethod, CHAP_A) pick the first
//! initiator value we support; "min" keys (MaxBurstLength, FirstBurstLength,
//! MaxOutstandingR2T, ErrorRecoveryLevel, MaxConnections, DefaultTime2Retain) answer the
//! minimum of both; "max" key DefaultTime2Wait the maximum; ImmediateData is an AND,
//! InitialR2T/DataPDUInOrder/DataSequenceInOrder are ORs. MaxRecvDataSegmentLength is
//! declarative in each direction. Values we cannot parse are answered `Reject`, keys we do not
//! know `NotUnderstood`, keys that make no sense for the session type `Irrelevant`.

use super::pdu::LoginHeader;

/// Login stages (CSG/NSG values).
pub mod stage {
    /// Security negotiation.
    pub const SECURITY: u8 = 0;
    /// Login operational negotiation.
    pub const OPERATIONAL: u8 = 1;
    /// Full feature phase.
    pub const FULL_FEATURE: u8 = 3;
}

/// Login response status codes (class << 8 | detail), RFC 7143 §11.13.5.
pub mod status {
    /// Success.
    pub const SUCCESS: u16 = 0x0000;
    /// Target moved temporarily (redirection: the response carries TargetAddress).
    pub const TARGET_MOVED_TEMPORARILY: u16 = 0x0101;
    /// Initiator error (miscellaneous).
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// Authentication failure.
    pub const AUTH_FAILED: u16 = 0x0201;
    /// Authorization failure.
    pub const FORBIDDEN: u16 = 0x0202;
    /// Target not found.
    pub const NOT_FOUND: u16 = 0x0203;
    /// Unsupported version.
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    /// Too many connections.
    pub const TOO_MANY_CONNECTIONS: u16 = 0x0206;
    /// Missing parameter.
    pub const MISSING_PARAMETER: u16 = 0x0207;
    /// Session type not supported.
    pub const SESSION_TYPE_UNSUPPORTED: u16 = 0x0209;
    /// Session does not exist.
    pub const NO_SESSION: u16 = 0x020a;
    /// Invalid request during login.
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
}

/// Our limits and defaults.
pub const TARGET_MAX_RECV_DATA_SEGMENT: u32 = 256 << 10;
/// Largest burst we accept or send (the key's maximum, 2^24 - 1).
pub const TARGET_MAX_BURST: u32 = (1 << 24) - 1;
/// Largest value of any numeric key.
const MAX_NUMERIC: u64 = (1 << 24) - 1;
/// CHAP challenge length in bytes.
pub const CHAP_CHALLENGE_LEN: usize = 16;

/// CHAP secrets for one target (or for discovery).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChapSecrets {
    /// The name the initiator must send in CHAP_N.
    pub initiator_user: String,
    /// The secret the initiator proves it knows.
    pub initiator_secret: Vec<u8>,
    /// For mutual CHAP: the name and secret the target answers with.
    pub target: Option<(String, Vec<u8>)>,
}

/// What [`Negotiation`] needs to know about a requested target.
pub trait TargetDirectory {
    /// The export behind the full iSCSI name `iqn`, if there is one.
    fn lookup(&self, iqn: &str) -> Option<String>;
    /// CHAP secrets required for `export` (`None`: AuthMethod=None is accepted).
    fn chap(&self, export: &str) -> Option<ChapSecrets>;
    /// CHAP secrets required for discovery sessions.
    fn discovery_chap(&self) -> Option<ChapSecrets>;
    /// Target Portal Group Tag to report.
    fn portal_group_tag(&self) -> u16;
    /// The portal (`host:port`) of the node that serves `iqn` when this one does not.
    fn moved(&self, _iqn: &str) -> Option<String> {
        None
    }
}

/// Discovery or normal session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionType {
    /// SendTargets only.
    Discovery,
    /// I/O to `export`.
    Normal {
        /// Export (vdisk) name.
        export: String,
        /// Its full iSCSI name.
        target_name: String,
    },
}

/// The outcome of login: operational parameters of the new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// Session type.
    pub session_type: SessionType,
    /// InitiatorName.
    pub initiator_name: String,
    /// Initiator Session ID.
    pub isid: [u8; 6],
    /// CRC32C header digests.
    pub header_digest: bool,
    /// CRC32C data digests.
    pub data_digest: bool,
    /// Longest data segment we may send (the initiator's MaxRecvDataSegmentLength).
    pub max_send_data_segment: u32,
    /// Longest data segment we accept.
    pub max_recv_data_segment: u32,
    /// MaxBurstLength.
    pub max_burst: u32,
    /// FirstBurstLength.
    pub first_burst: u32,
    /// ImmediateData.
    pub immediate_data: bool,
    /// InitialR2T.
    pub initial_r2t: bool,
}

/// The reply to one Login Request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// T bit.
    pub transit: bool,
    /// NSG (meaningful when `transit`).
    pub nsg: u8,
    /// Status (non-success ends the connection after the response).
    pub status: u16,
    /// Keys to send back.
    pub keys: Vec<(String, String)>,
    /// Set when this response completes login.
    pub done: Option<SessionParams>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// Nothing chosen yet.
    Unchosen,
    /// AuthMethod=None agreed, or not needed.
    Done,
    /// CHAP chosen; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapResponse,
}

/// The login state of one connection.
#[derive(Debug)]
pub struct Negotiation {
    challenge: [u8; CHAP_CHALLENGE_LEN],
    chap_id: u8,
    first: bool,
    auth: Auth,
    chap: Option<ChapSecrets>,
    session_type: Option<SessionType>,
    initiator_name: Option<String>,
    isid: [u8; 6],
    declared_max_recv: bool,
    sent_tpgt: bool,
    params: Ops,
}

#[derive(Debug, Clone, Copy)]
struct Ops {
    header_digest: bool,
    data_digest: bool,
    max_send_data_segment: u32,
    max_burst: u32,
    first_burst: u32,
    immediate_data: bool,
    initial_r2t: bool,
}

impl Default for Ops {
    fn default() -> Self {
        // RFC 7143 defaults for keys the initiator does not send.
        Ops {
            header_digest: false,
            data_digest: false,
            max_send_data_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
        }
    }
}

fn fail(status: u16) -> Step {
    Step {
        transit: false,
        nsg: 0,
        status,
        keys: Vec::new(),
        done: None,
    }
}

fn parse_number(value: &str) -> Option<u64> {
    let n = if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        value.parse().ok()?
    };
    (n <= MAX_NUMERIC).then_some(n)
}

fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(v: bool) -> String {
    if v { "Yes" } else { "No" }.to_owned()
}

/// Decodes a CHAP binary value (`0x` hex or `0b` base64).
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        // An odd digit count has an implied leading zero.
        let padded;
        let hex = if hex.len() % 2 == 1 {
            padded = format!("0{hex}");
            padded.as_str()
        } else {
            hex
        };
        if hex.is_empty() {
            return None;
        }
        return (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
    }
    if let Some(b64) = value
        .strip_prefix("0b")
        .or_else(|| value.strip_prefix("0B"))
    {
        return decode_base64(b64);
    }
    None
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Encodes bytes as a CHAP `0x` hex value.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The CHAP response MD5(id || secret || challenge) (RFC 1994).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut ctx = md5::Context::new();
    ctx.consume([id]);
    ctx.consume(secret);
    ctx.consume(challenge);
    ctx.compute().0
}

fn find<'a>(keys: &'a [(String, String)], key: &str) -> Option<&'a str> {
    keys.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Keys handled in the security stage only.
const SECURITY_KEYS: &[&str] = &[
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
];
/// Declarative keys from the initiator that need no answer.
const DECLARATIVE_KEYS: &[&str] = &[
    "InitiatorName",
    "InitiatorAlias",
    "SessionType",
    "TargetName",
];

impl Negotiation {
    /// A fresh negotiation; `challenge` and `chap_id` must be unpredictable (they are used
    /// only if CHAP is required).
    pub fn new(challenge: [u8; CHAP_CHALLENGE_LEN], chap_id: u8) -> Negotiation {
        Negotiation {
            challenge,
            chap_id,
            first: true,
            auth: Auth::Unchosen,
            chap: None,
            session_type: None,
            initiator_name: None,
            isid: [0; 6],
            declared_max_recv: false,
            sent_tpgt: false,
            params: Ops::default(),
        }
    }

    /// Answers one complete Login Request (header and all its keys).
    pub fn step(
        &mut self,
        header: &LoginHeader,
        keys: &[(String, String)],
        dir: &impl TargetDirectory,
    ) -> Step {
        if header.version_min > 0 {
            return fail(status::UNSUPPORTED_VERSION);
        }
        if header.csg == 2 || (header.transit && (header.nsg == 2 || header.nsg <= header.csg)) {
            return fail(status::INITIATOR_ERROR);
        }
        if header.csg == stage::FULL_FEATURE {
            return fail(status::INITIATOR_ERROR);
        }
        let mut out = Vec::new();
        if self.first {
            self.first = false;
            if header.tsih != 0 {
                // MaxConnections=1: there is no session to add a connection to.
                return fail(status::NO_SESSION);
            }
            self.isid = header.isid;
            let Some(initiator) = find(keys, "InitiatorName") else {
                return fail(status::MISSING_PARAMETER);
            };
            if initiator.is_empty() {
                return fail(status::MISSING_PARAMETER);
            }
            self.initiator_name = Some(initiator.to_owned());
            let session_type = match find(keys, "SessionType").unwrap_or("Normal") {
                "Normal" => {
                    let Some(name) = find(keys, "TargetName") else {
                        return fail(status::MISSING_PARAMETER);
                    };
                    let Some(export) = dir.lookup(name) else {
                        // Served by another node (its owner moved): send the initiator there
                        // (RFC 7143 11.13.5, redirection, with TargetAddress).
                        if let Some(portal) = dir.moved(name) {
                            return Step {
                                keys: vec![(
                                    "TargetAddress".to_owned(),
                                    format!("{portal},{}", dir.portal_group_tag()),
                                )],
                                ..fail(status::TARGET_MOVED_TEMPORARILY)
                            };
                        }
                        return fail(status::NOT_FOUND);
                    };
                    self.chap = dir.chap(&export);
                    SessionType::Normal {
                        export,
                        target_name: name.to_owned(),
                    }
                }
                "Discovery" => {
                    self.chap = dir.discovery_chap();
                    SessionType::Discovery
                }
                _ => return fail(status::SESSION_TYPE_UNSUPPORTED),
            };
            self.session_type = Some(session_type);
            if header.csg == stage::OPERATIONAL {
                if self.chap.is_some() {
                    return fail(status::AUTH_FAILED);
                }
                self.auth = Auth::Done;
            }
        }
        let normal = matches!(self.session_type, Some(SessionType::Normal { .. }));
        if normal && !self.sent_tpgt {
            self.sent_tpgt = true;
            out.push((
                "TargetPortalGroupTag".to_owned(),
                dir.portal_group_tag().to_string(),
            ));
        }

        if header.csg == stage::SECURITY {
            if let Err(status) = self.security(keys, &mut out) {
                return fail(status);
            }
        } else if self.auth != Auth::Done {
            // Moving to the operational stage before authentication finished.
            return fail(status::AUTH_FAILED);
        }
        // Operational keys are answered in either stage (some initiators send them early).
        for (key, value) in keys {
            if SECURITY_KEYS.contains(&key.as_str()) || DECLARATIVE_KEYS.contains(&key.as_str()) {
                continue;
            }
            if let Some(answer) = self.operational(key, value, normal) {
                out.push((key.clone(), answer));
            }
        }
        if header.csg == stage::OPERATIONAL && !self.declared_max_recv {
            self.declared_max_recv = true;
            out.push((
                "MaxRecvDataSegmentLength".to_owned(),
                TARGET_MAX_RECV_DATA_SEGMENT.to_string(),
            ));
        }

        let transit = header.transit && self.auth == Auth::Done;
        let mut step = Step {
            transit,
            nsg: if transit { header.nsg } else { 0 },
            status: status::SUCCESS,
            keys: out,
            done: None,
        };
        if transit && header.nsg == stage::FULL_FEATURE {
            if !self.declared_max_recv {
                self.declared_max_recv = true;
                step.keys.push((
                    "MaxRecvDataSegmentLength".to_owned(),
                    TARGET_MAX_RECV_DATA_SEGMENT.to_string(),
                ));
            }
            let p = self.params;
            step.done = Some(SessionParams {
                session_type: self.session_type.clone().expect("set on the first request"),
                initiator_name: self
                    .initiator_name
                    .clone()
                    .expect("set on the first request"),
                isid: self.isid,
                header_digest: p.header_digest,
                data_digest: p.data_digest,
                max_send_data_segment: p.max_send_data_segment,
                max_recv_data_segment: TARGET_MAX_RECV_DATA_SEGMENT,
                max_burst: p.max_burst,
                first_burst: p.first_burst.min(p.max_burst),
                immediate_data: p.immediate_data,
                initial_r2t: p.initial_r2t,
            });
        }
        step
    }

    /// Security-stage keys: AuthMethod and the CHAP exchange.
    fn security(
        &mut self,
        keys: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        if let Some(methods) = find(keys, "AuthMethod") {
            if self.auth != Auth::Unchosen {
                return Err(status::INITIATOR_ERROR);
            }
            let offered: Vec<&str> = methods.split(',').collect();
            if self.chap.is_some() {
                if !offered.contains(&"CHAP") {
                    return Err(status::AUTH_FAILED);
                }
                out.push(("AuthMethod".into(), "CHAP".into()));
                self.auth = Auth::ChapAlgorithm;
            } else if offered.contains(&"None") {
                out.push(("AuthMethod".into(), "None".into()));
                self.auth = Auth::Done;
            } else {
                out.push(("AuthMethod".into(), "Reject".into()));
                return Err(status::AUTH_FAILED);
            }
            return Ok(());
        }
        match self.auth {
            Auth::Unchosen => {
                // No AuthMethod offered: only acceptable when none is needed.
                if self.chap.is_some() {
                    return Err(status::AUTH_FAILED);
                }
                self.auth = Auth::Done;
            }
            Auth::Done => {}
            Auth::ChapAlgorithm => {
                let Some(algorithms) = find(keys, "CHAP_A") else {
                    return Err(status::AUTH_FAILED);
                };
                if !algorithms.split(',').any(|a| a == "5") {
                    out.push(("CHAP_A".into(), "Reject".into()));
                    return Err(status::AUTH_FAILED);
                }
                out.push(("CHAP_A".into(), "5".into()));
                out.push(("CHAP_I".into(), self.chap_id.to_string()));
                out.push(("CHAP_C".into(), encode_hex(&self.challenge)));
                self.auth = Auth::ChapResponse;
            }
            Auth::ChapResponse => {
                let chap = self.chap.clone().expect("CHAP chosen only with secrets");
                let (Some(name), Some(response)) = (find(keys, "CHAP_N"), find(keys, "CHAP_R"))
                else {
                    return Err(status::AUTH_FAILED);
                };
                let expected = chap_response(self.chap_id, &chap.initiator_secret, &self.challenge);
                if name != chap.initiator_user
                    || decode_binary(response).as_deref() != Some(&expected[..])
                {
                    return Err(status::AUTH_FAILED);
                }
                match (find(keys, "CHAP_I"), find(keys, "CHAP_C"), &chap.target) {
                    (None, None, _) => {}
                    (Some(id), Some(challenge), Some((user, secret))) => {
                        let id = id.parse::<u8>().map_err(|_| status::AUTH_FAILED)?;
                        let challenge = decode_binary(challenge).ok_or(status::AUTH_FAILED)?;
                        // A reflected challenge would make us answer our own question.
                        if challenge == self.challenge || challenge.is_empty() {
                            return Err(status::AUTH_FAILED);
                        }
                        out.push(("CHAP_N".into(), user.clone()));
                        out.push((
                            "CHAP_R".into(),
                            encode_hex(&chap_response(id, secret, &challenge)),
                        ));
                    }
                    _ => return Err(status::AUTH_FAILED),
                }
                self.auth = Auth::Done;
            }
        }
        Ok(())
    }

    /// The answer to one operational key (`None`: nothing to send).
    fn operational(&mut self, key: &str, value: &str, normal: bool) -> Option<String> {
        let p = &mut self.params;
        let reject = || Some("Reject".to_owned());
        let session_only = matches!(
            key,
            "MaxBurstLength"
                | "FirstBurstLength"
                | "ImmediateData"
                | "InitialR2T"
                | "MaxOutstandingR2T"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
        );
        if session_only && !normal {
            return Some("Irrelevant".to_owned());
        }
        match key {
            "HeaderDigest" | "DataDigest" => {
                let choice = value.split(',').find(|v| *v == "CRC32C" || *v == "None")?;
                let crc = choice == "CRC32C";
                if key == "HeaderDigest" {
                    p.header_digest = crc;
                } else {
                    p.data_digest = crc;
                }
                Some(choice.to_owned())
            }
            "MaxRecvDataSegmentLength" => {
                // Declarative: what the initiator can receive.
                match parse_number(value) {
                    Some(n) if n >= 512 => {
                        p.max_send_data_segment = n as u32;
                        None
                    }
                    _ => reject(),
                }
            }
            "MaxBurstLength" | "FirstBurstLength" => match parse_number(value) {
                Some(n) if n >= 512 => {
                    let n = (n as u32).min(TARGET_MAX_BURST);
                    if key == "MaxBurstLength" {
                        p.max_burst = n;
                    } else {
                        p.first_burst = n;
                    }
                    Some(n.to_string())
                }
                _ => reject(),
            },
            "ImmediateData" => {
                let v = parse_bool(value)?;
                p.immediate_data = v;
                Some(yes_no(v))
            }
            "InitialR2T" => {
                let v = parse_bool(value)?;
                p.initial_r2t = v;
                Some(yes_no(v))
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                parse_bool(value)?;
                Some("Yes".to_owned())
            }
            "MaxOutstandingR2T" | "MaxConnections" => match parse_number(value) {
                Some(n) if n >= 1 => Some("1".to_owned()),
                _ => reject(),
            },
            "ErrorRecoveryLevel" => match parse_number(value) {
                Some(n) if n <= 2 => Some("0".to_owned()),
                _ => reject(),
            },
            "DefaultTime2Wait" => match parse_number(value) {
                Some(n) if n <= 3600 => Some(n.max(2).to_string()),
                _ => reject(),
            },
            "DefaultTime2Retain" => match parse_number(value) {
                Some(n) if n <= 3600 => Some("0".to_owned()),
                _ => reject(),
            },
            "IFMarker" | "OFMarker" => {
                parse_bool(value)?;
                Some("No".to_owned())
            }
            "IFMarkInt" | "OFMarkInt" => Some("Irrelevant".to_owned()),
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {
                // Target-declared keys an initiator must not send.
                reject()
            }
            "SendTargets" => Some("Irrelevant".to_owned()),
            _ => Some("NotUnderstood".to_owned()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir {
        chap: Option<ChapSecrets>,
    }

    impl TargetDirectory for Dir {
        fn lookup(&self, iqn: &str) -> Option<String> {
            iqn.strip_prefix("iqn.2026-11.io.cairn:").map(str::to_owned)
        }
        fn chap(&self, _export: &str) -> Option<ChapSecrets> {
            self.chap.clone()
        }
        fn discovery_chap(&self) -> Option<ChapSecrets> {
            None
        }
        fn portal_group_tag(&self) -> u16 {
            1
        }
        fn moved(&self, iqn: &str) -> Option<String> {
            (iqn == "iqn.elsewhere:vd9").then(|| "10.0.0.9:3260".to_owned())
        }
    }

    #[test]
    fn a_target_served_elsewhere_is_redirected() {
        let dir = Dir { chap: None };
        let s = Negotiation::new([0; 16], 1).step(
            &header(0, 1, true),
            &keys(&[("InitiatorName", "i"), ("TargetName", "iqn.elsewhere:vd9")]),
            &dir,
        );
        assert_eq!(s.status, status::TARGET_MOVED_TEMPORARILY);
        assert_eq!(answer(&s, "TargetAddress"), Some("10.0.0.9:3260,1"));
        assert!(s.done.is_none());
    }

    fn header(csg: u8, nsg: u8, transit: bool) -> LoginHeader {
        LoginHeader {
            transit,
            continue_bit: false,
            csg,
            nsg,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 0, 0, 0, 0, 1],
            tsih: 0,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        }
    }

    fn keys(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn answer<'a>(step: &'a Step, key: &str) -> Option<&'a str> {
        find(&step.keys, key)
    }

    #[test]
    fn normal_login_without_auth_negotiates_operational_keys() {
        let dir = Dir { chap: None };
        let mut n = Negotiation::new([7; 16], 1);
        let s = n.step(
            &header(0, 1, true),
            &keys(&[
                ("InitiatorName", "iqn.i"),
                ("TargetName", "iqn.2026-11.io.cairn:vd0"),
                ("SessionType", "Normal"),
                ("AuthMethod", "None"),
            ]),
            &dir,
        );
        assert_eq!(s.status, 0);
        assert!(s.transit);
        assert_eq!(answer(&s, "AuthMethod"), Some("None"));
        assert_eq!(answer(&s, "TargetPortalGroupTag"), Some("1"));
        let s = n.step(
            &header(1, 3, true),
            &keys(&[
                ("HeaderDigest", "CRC32C,None"),
                ("DataDigest", "None"),
                ("MaxRecvDataSegmentLength", "65536"),
                ("MaxBurstLength", "262144"),
                ("FirstBurstLength", "131072"),
                ("ImmediateData", "Yes"),
                ("InitialR2T", "No"),
                ("ErrorRecoveryLevel", "2"),
                ("MaxConnections", "4"),
                ("X-foo", "bar"),
                ("MaxOutstandingR2T", "junk"),
            ]),
            &dir,
        );
        assert_eq!(s.status, 0);
        assert_eq!(answer(&s, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(answer(&s, "ErrorRecoveryLevel"), Some("0"));
        assert_eq!(answer(&s, "MaxConnections"), Some("1"));
        assert_eq!(answer(&s, "X-foo"), Some("NotUnderstood"));
        assert_eq!(answer(&s, "MaxOutstandingR2T"), Some("Reject"));
        assert_eq!(answer(&s, "MaxRecvDataSegmentLength"), Some("262144"));
        let done = s.done.expect("login complete");
        assert!(done.header_digest && !done.data_digest);
        assert_eq!(done.max_send_data_segment, 65536);
        assert_eq!((done.max_burst, done.first_burst), (262_144, 131_072));
        assert!(done.immediate_data && !done.initial_r2t);
    }

    #[test]
    fn unknown_target_and_missing_name_fail() {
        let dir = Dir { chap: None };
        let s = Negotiation::new([0; 16], 1).step(
            &header(0, 1, true),
            &keys(&[("InitiatorName", "i"), ("TargetName", "iqn.other:x")]),
            &dir,
        );
        assert_eq!(s.status, status::NOT_FOUND);
        let s = Negotiation::new([0; 16], 1).step(
            &header(0, 1, true),
            &keys(&[("TargetName", "iqn.2026-11.io.cairn:x")]),
            &dir,
        );
        assert_eq!(s.status, status::MISSING_PARAMETER);
        let discovery = Negotiation::new([0; 16], 1).step(
            &header(1, 3, true),
            &keys(&[
                ("InitiatorName", "i"),
                ("SessionType", "Discovery"),
                ("ImmediateData", "Yes"),
            ]),
            &dir,
        );
        assert_eq!(discovery.status, 0);
        assert_eq!(answer(&discovery, "ImmediateData"), Some("Irrelevant"));
        assert_eq!(discovery.done.unwrap().session_type, SessionType::Discovery);
    }

    fn chap_dir(mutual: bool) -> Dir {
        Dir {
            chap: Some(ChapSecrets {
                initiator_user: "user".into(),
                initiator_secret: b"secretsecret".to_vec(),
                target: mutual.then(|| ("tgt".into(), b"targetsecret".to_vec())),
            }),
        }
    }

    fn chap_start(n: &mut Negotiation, dir: &Dir) -> (u8, Vec<u8>) {
        let s = n.step(
            &header(0, 1, true),
            &keys(&[
                ("InitiatorName", "i"),
                ("TargetName", "iqn.2026-11.io.cairn:vd0"),
                ("AuthMethod", "CHAP,None"),
            ]),
            dir,
        );
        assert_eq!(answer(&s, "AuthMethod"), Some("CHAP"));
        assert!(!s.transit);
        let s = n.step(&header(0, 1, false), &keys(&[("CHAP_A", "7,5")]), dir);
        assert_eq!(answer(&s, "CHAP_A"), Some("5"));
        let id = answer(&s, "CHAP_I").unwrap().parse().unwrap();
        let challenge = decode_binary(answer(&s, "CHAP_C").unwrap()).unwrap();
        (id, challenge)
    }

    #[test]
    fn one_way_chap() {
        let dir = chap_dir(false);
        let mut n = Negotiation::new([9; 16], 42);
        let (id, c) = chap_start(&mut n, &dir);
        assert_eq!((id, c.as_slice()), (42, &[9u8; 16][..]));
        let r = encode_hex(&chap_response(id, b"secretsecret", &c));
        let s = n.step(
            &header(0, 1, true),
            &keys(&[("CHAP_N", "user"), ("CHAP_R", &r)]),
            &dir,
        );
        assert_eq!(s.status, 0);
        assert!(s.transit);
        // Wrong secret fails.
        let mut n = Negotiation::new([9; 16], 42);
        let (id, c) = chap_start(&mut n, &dir);
        let r = encode_hex(&chap_response(id, b"wrong", &c));
        let s = n.step(
            &header(0, 1, true),
            &keys(&[("CHAP_N", "user"), ("CHAP_R", &r)]),
            &dir,
        );
        assert_eq!(s.status, status::AUTH_FAILED);
        // Skipping security when CHAP is required fails.
        let s = Negotiation::new([0; 16], 1).step(
            &header(1, 3, true),
            &keys(&[
                ("InitiatorName", "i"),
                ("TargetName", "iqn.2026-11.io.cairn:vd0"),
            ]),
            &dir,
        );
        assert_eq!(s.status, status::AUTH_FAILED);
    }

    #[test]
    fn mutual_chap() {
        let dir = chap_dir(true);
        let mut n = Negotiation::new([3; 16], 5);
        let (id, c) = chap_start(&mut n, &dir);
        let r = encode_hex(&chap_response(id, b"secretsecret", &c));
        let s = n.step(
            &header(0, 1, true),
            &keys(&[
                ("CHAP_N", "user"),
                ("CHAP_R", &r),
                ("CHAP_I", "77"),
                ("CHAP_C", "0x0102030405"),
            ]),
            &dir,
        );
        assert_eq!(s.status, 0);
        assert_eq!(answer(&s, "CHAP_N"), Some("tgt"));
        let expected = chap_response(77, b"targetsecret", &[1, 2, 3, 4, 5]);
        assert_eq!(
            decode_binary(answer(&s, "CHAP_R").unwrap()).unwrap(),
            expected
        );
        // A reflected challenge is refused.
        let mut n = Negotiation::new([3; 16], 5);
        let (id, c) = chap_start(&mut n, &dir);
        let r = encode_hex(&chap_response(id, b"secretsecret", &c));
        let s = n.step(
            &header(0, 1, true),
            &keys(&[
                ("CHAP_N", "user"),
                ("CHAP_R", &r),
                ("CHAP_I", "5"),
                ("CHAP_C", &encode_hex(&c)),
            ]),
            &dir,
        );
        assert_eq!(s.status, status::AUTH_FAILED);
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(decode_binary("0xzz"), None);
    }
}
