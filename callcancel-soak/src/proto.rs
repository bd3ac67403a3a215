//! `callcancel.demo.Demo` as fixed in DESIGN.md: hand-written prost messages
//! (field numbers as in the proto) and a small tonic client over a
//! `tonic::transport::Channel`. The demo's own structs live in an example of
//! `callcancel-tower` and are not exported by the crate.

use http::uri::PathAndQuery;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// `message WorkRequest { uint64 millis = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkRequest {
    #[prost(uint64, tag = "1")]
    pub millis: u64,
}

/// `message WorkReply { uint64 call_id = 1; }`
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkReply {
    #[prost(uint64, tag = "1")]
    pub call_id: u64,
}

/// `message StatsRequest {}`
#[derive(Clone, PartialEq, prost::Message)]
pub struct StatsRequest {}

/// `message StatsReply { ... }` (field numbers 1–9 as in DESIGN.md).
#[derive(Clone, Copy, PartialEq, Eq, prost::Message)]
pub struct StatsReply {
    #[prost(uint64, tag = "1")]
    pub in_flight: u64,
    #[prost(uint64, tag = "2")]
    pub started: u64,
    #[prost(uint64, tag = "3")]
    pub completed: u64,
    #[prost(uint64, tag = "4")]
    pub cancelled_host_abort: u64,
    #[prost(uint64, tag = "5")]
    pub cancelled_channel_faulted: u64,
    #[prost(uint64, tag = "6")]
    pub cancelled_call: u64,
    #[prost(uint64, tag = "7")]
    pub cancelled_deadline: u64,
    #[prost(uint64, tag = "8")]
    pub freed: u64,
    #[prost(uint64, tag = "9")]
    pub refused: u64,
}

/// The StatsReply field names, in field order (also the names of the
/// demo's final counters line).
pub const FIELDS: [&str; 9] = [
    "in_flight",
    "started",
    "completed",
    "cancelled_host_abort",
    "cancelled_channel_faulted",
    "cancelled_call",
    "cancelled_deadline",
    "freed",
    "refused",
];

impl StatsReply {
    fn get_mut(&mut self, name: &str) -> Option<&mut u64> {
        Some(match name {
            "in_flight" => &mut self.in_flight,
            "started" => &mut self.started,
            "completed" => &mut self.completed,
            "cancelled_host_abort" => &mut self.cancelled_host_abort,
            "cancelled_channel_faulted" => &mut self.cancelled_channel_faulted,
            "cancelled_call" => &mut self.cancelled_call,
            "cancelled_deadline" => &mut self.cancelled_deadline,
            "freed" => &mut self.freed,
            "refused" => &mut self.refused,
            _ => return None,
        })
    }

    /// The counters as `(name, value)` in field order.
    pub fn fields(&self) -> [(&'static str, u64); 9] {
        [
            (FIELDS[0], self.in_flight),
            (FIELDS[1], self.started),
            (FIELDS[2], self.completed),
            (FIELDS[3], self.cancelled_host_abort),
            (FIELDS[4], self.cancelled_channel_faulted),
            (FIELDS[5], self.cancelled_call),
            (FIELDS[6], self.cancelled_deadline),
            (FIELDS[7], self.freed),
            (FIELDS[8], self.refused),
        ]
    }

    /// Parses the demo's final line: exactly the nine `name=value` pairs.
    pub fn parse_line(line: &str) -> Result<Self, String> {
        let mut s = StatsReply::default();
        let mut seen = Vec::new();
        for pair in line.split_whitespace() {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("not name=value: {pair:?}"))?;
            let slot = s
                .get_mut(k)
                .ok_or_else(|| format!("unknown counter {k:?}"))?;
            *slot = v.parse().map_err(|_| format!("bad value in {pair:?}"))?;
            if seen.contains(&k) {
                return Err(format!("counter {k} twice"));
            }
            seen.push(k);
        }
        if seen.len() != FIELDS.len() {
            return Err(format!("{} of {} counters", seen.len(), FIELDS.len()));
        }
        Ok(s)
    }

    /// Cancel callbacks run, all reasons.
    pub fn cancelled(&self) -> u64 {
        self.cancelled_host_abort
            + self.cancelled_channel_faulted
            + self.cancelled_call
            + self.cancelled_deadline
    }

    /// `name=value` pairs, as the demo prints them.
    pub fn line(&self) -> String {
        self.fields()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The counters summed field by field (B's incarnations).
    pub fn add(&mut self, o: &StatsReply) {
        self.in_flight += o.in_flight;
        self.started += o.started;
        self.completed += o.completed;
        self.cancelled_host_abort += o.cancelled_host_abort;
        self.cancelled_channel_faulted += o.cancelled_channel_faulted;
        self.cancelled_call += o.cancelled_call;
        self.cancelled_deadline += o.cancelled_deadline;
        self.freed += o.freed;
        self.refused += o.refused;
    }
}

/// The three work RPCs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Method {
    Work,
    Block,
    Relay,
}

impl Method {
    pub fn path(self) -> &'static str {
        match self {
            Method::Work => "/callcancel.demo.Demo/Work",
            Method::Block => "/callcancel.demo.Demo/Block",
            Method::Relay => "/callcancel.demo.Demo/Relay",
        }
    }
}

/// A `callcancel.demo.Demo` client.
#[derive(Clone)]
pub struct DemoClient {
    inner: tonic::client::Grpc<Channel>,
}

impl DemoClient {
    pub fn new(channel: Channel) -> Self {
        Self {
            inner: tonic::client::Grpc::new(channel),
        }
    }

    async fn unary<Q, R>(&mut self, path: &'static str, req: Request<Q>) -> Result<R, Status>
    where
        Q: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Q, R>::default();
        Ok(self
            .inner
            .unary(req, PathAndQuery::from_static(path), codec)
            .await?
            .into_inner())
    }

    pub async fn call(
        &mut self,
        m: Method,
        req: Request<WorkRequest>,
    ) -> Result<WorkReply, Status> {
        self.unary(m.path(), req).await
    }

    pub async fn stats(&mut self) -> Result<StatsReply, Status> {
        self.unary("/callcancel.demo.Demo/Stats", Request::new(StatsRequest {}))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_demo_line() {
        let s = StatsReply {
            in_flight: 0,
            started: 9,
            completed: 3,
            cancelled_host_abort: 1,
            cancelled_channel_faulted: 2,
            cancelled_call: 2,
            cancelled_deadline: 1,
            freed: 9,
            refused: 4,
        };
        assert_eq!(StatsReply::parse_line(&s.line()), Ok(s));
        assert_eq!(s.cancelled(), 6);
    }

    #[test]
    fn rejects_partial_or_odd_lines() {
        assert!(StatsReply::parse_line("started=1 freed=1").is_err());
        assert!(StatsReply::parse_line("listening on 127.0.0.1:1").is_err());
        let dup = "in_flight=0 started=1 completed=1 cancelled_host_abort=0 \
                   cancelled_channel_faulted=0 cancelled_call=0 cancelled_deadline=0 freed=1 freed=1";
        assert!(StatsReply::parse_line(dup).is_err());
    }
}
