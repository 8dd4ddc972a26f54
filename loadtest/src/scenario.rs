//! The named load-test scenarios and what each one sends.

use clap::ValueEnum;

/// Which HTTP API a scenario speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// The original Flask demo's `POST /put` and `GET /get?key=`.
    Demo,
    /// `PUT` and `GET /v1/kv/{key}` with raw bodies.
    V1,
}

/// Relative weights of reads and writes in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mix {
    /// Weight of GET requests.
    pub get: usize,
    /// Weight of PUT requests.
    pub put: usize,
}

impl Mix {
    /// Fraction of requests that are reads.
    pub fn read_fraction(self) -> f64 {
        self.get as f64 / (self.get + self.put) as f64
    }
}

/// A named workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// The demo's Locust file: 2 GETs per PUT on the demo API.
    Demo,
    /// 95% GET / 5% PUT on the v1 API.
    ReadHeavy,
    /// 10% GET / 90% PUT on the v1 API.
    WriteHeavy,
    /// Half GETs, half PUTs of 64 KiB values on the v1 API.
    LargeValues,
}

impl Scenario {
    /// Every scenario, in the order `--help` lists them.
    pub const ALL: [Scenario; 4] = [
        Scenario::Demo,
        Scenario::ReadHeavy,
        Scenario::WriteHeavy,
        Scenario::LargeValues,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Demo => "demo",
            Scenario::ReadHeavy => "read-heavy",
            Scenario::WriteHeavy => "write-heavy",
            Scenario::LargeValues => "large-values",
        }
    }

    /// The API the scenario exercises.
    pub fn api(self) -> Api {
        match self {
            Scenario::Demo => Api::Demo,
            _ => Api::V1,
        }
    }

    /// Read/write weights.
    pub fn mix(self) -> Mix {
        match self {
            Scenario::Demo => Mix { get: 2, put: 1 },
            Scenario::ReadHeavy => Mix { get: 95, put: 5 },
            Scenario::WriteHeavy => Mix { get: 10, put: 90 },
            Scenario::LargeValues => Mix { get: 1, put: 1 },
        }
    }

    /// Value size when `--value-size` is not given.
    pub fn default_value_size(self) -> usize {
        match self {
            Scenario::LargeValues => 64 * 1024,
            _ => 100,
        }
    }

    /// Keyspace when `--keyspace` is not given; smaller for large values so a long run
    /// does not turn into a disk-filling test.
    pub fn default_keyspace(self) -> u64 {
        match self {
            Scenario::LargeValues => 1_000,
            _ => 10_000,
        }
    }
}

/// Everything a running user needs to know to generate requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The workload.
    pub scenario: Scenario,
    /// Keys are drawn uniformly from `0..keyspace`.
    pub keyspace: u64,
    /// Bytes per written value.
    pub value_size: usize,
}

impl Plan {
    /// A plan with the scenario's defaults for whatever was not given.
    pub fn new(scenario: Scenario, keyspace: Option<u64>, value_size: Option<usize>) -> Self {
        Plan {
            scenario,
            keyspace: keyspace
                .unwrap_or_else(|| scenario.default_keyspace())
                .max(1),
            value_size: value_size.unwrap_or_else(|| scenario.default_value_size()),
        }
    }
}

/// Path of a v1 key.
pub fn v1_path(key: &str) -> String {
    format!("/v1/kv/{key}")
}

/// Path of a demo-API read; key names are URL-safe so no escaping is needed.
pub fn demo_get_path(key: &str) -> String {
    format!("/get?key={key}")
}

/// JSON body of a demo-API write.
pub fn demo_put_body(key: &str, value: &str) -> serde_json::Value {
    serde_json::json!({ "key": key, "value": value })
}

/// What a demo-API `GET /get` answered.
#[derive(Debug, PartialEq, Eq)]
pub enum DemoGet {
    /// `{"key": K, "value": V}`.
    Found(String),
    /// `{"status": "Key not found"}`.
    NotFound,
    /// Anything else.
    Invalid,
}

/// Interprets a demo-API `GET /get` body for `key`.
pub fn parse_demo_get(key: &str, body: &[u8]) -> DemoGet {
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) else {
        return DemoGet::Invalid;
    };
    if json.get("status").and_then(|s| s.as_str()) == Some("Key not found") {
        return DemoGet::NotFound;
    }
    match (json.get("key").and_then(|k| k.as_str()), json.get("value")) {
        (Some(k), Some(serde_json::Value::String(v))) if k == key => DemoGet::Found(v.clone()),
        _ => DemoGet::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_match_the_issue() {
        assert!((Scenario::Demo.mix().read_fraction() - 2.0 / 3.0).abs() < 1e-9);
        assert!((Scenario::ReadHeavy.mix().read_fraction() - 0.95).abs() < 1e-9);
        assert!((Scenario::WriteHeavy.mix().read_fraction() - 0.10).abs() < 1e-9);
        assert_eq!(Scenario::Demo.api(), Api::Demo);
        for s in [
            Scenario::ReadHeavy,
            Scenario::WriteHeavy,
            Scenario::LargeValues,
        ] {
            assert_eq!(s.api(), Api::V1);
        }
    }

    #[test]
    fn names_round_trip_through_clap() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::from_str(s.name(), false), Ok(s));
        }
    }

    #[test]
    fn plan_defaults_depend_on_the_scenario() {
        let large = Plan::new(Scenario::LargeValues, None, None);
        assert_eq!(large.value_size, 65_536);
        assert_eq!(large.keyspace, 1_000);
        let custom = Plan::new(Scenario::ReadHeavy, Some(0), Some(10));
        assert_eq!(
            custom.keyspace, 1,
            "an empty keyspace would make key choice panic"
        );
        assert_eq!(custom.value_size, 10);
    }

    #[test]
    fn demo_get_bodies() {
        let found = br#"{"key":"k1","value":"v"}"#;
        assert_eq!(parse_demo_get("k1", found), DemoGet::Found("v".into()));
        assert_eq!(
            parse_demo_get("k2", found),
            DemoGet::Invalid,
            "answer for another key"
        );
        assert_eq!(
            parse_demo_get("k1", br#"{"status":"Key not found"}"#),
            DemoGet::NotFound
        );
        assert_eq!(parse_demo_get("k1", b"<html>"), DemoGet::Invalid);
        assert_eq!(
            parse_demo_get("k1", br#"{"key":"k1","value":3}"#),
            DemoGet::Invalid
        );
    }

    #[test]
    fn demo_put_body_shape() {
        assert_eq!(
            demo_put_body("k", "v").to_string(),
            r#"{"key":"k","value":"v"}"#
        );
        assert_eq!(v1_path("key-1"), "/v1/kv/key-1");
        assert_eq!(demo_get_path("key-1"), "/get?key=key-1");
    }
}
