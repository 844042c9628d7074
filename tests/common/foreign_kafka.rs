//! A foreign Kafka producer: librdkafka's C API (through rdkafka-sys)
//! writing records whose header names and values are arbitrary bytes, as
//! producers in C, Go or Java can. rdkafka's Rust API cannot write a header
//! name that is not UTF-8, so this goes around it.
//!
//! Used by `tests/kafka.rs` and `tests/kafka_tansu.rs` (as
//! `#[path = "common/foreign_kafka.rs"] mod foreign_kafka;`, so the other
//! test binaries, built without rdkafka, do not see it).

use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

use rdkafka::bindings as rdsys;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

/// One record as a foreign producer writes it.
pub struct RawRecord<'a> {
    pub partition: i32,
    pub key: Option<&'a [u8]>,
    /// (name, value); `None` is a null value.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    pub payload: &'a [u8],
}

pub struct ForeignProducer {
    producer: BaseProducer,
}

fn vu(vtype: rdsys::rd_kafka_vtype_t, u: rdsys::rd_kafka_vu_s__bindgen_ty_1) -> rdsys::rd_kafka_vu_t {
    rdsys::rd_kafka_vu_t { vtype, u }
}

impl ForeignProducer {
    pub fn new(brokers: &str) -> ForeignProducer {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "0")
            // tansu 0.6 needs one record per batch (see kafka_tansu.rs).
            .set("batch.num.messages", "1")
            .create()
            .expect("foreign producer");
        ForeignProducer { producer }
    }

    /// Writes `record` to `topic` through `rd_kafka_produceva` and waits
    /// until it is acknowledged (records are written one at a time, so in
    /// order).
    pub fn send(&self, topic: &str, record: &RawRecord<'_>) {
        use rdsys::rd_kafka_vtype_t as V;
        let rk = self.producer.client().native_ptr();
        let topic_c = CString::new(topic).unwrap();
        // SAFETY: every pointer handed to librdkafka outlives the call
        // (RD_KAFKA_MSG_F_COPY copies key and value; header names and values
        // are copied by rd_kafka_header_add); the headers list is owned by
        // librdkafka once produceva succeeds and destroyed here otherwise.
        unsafe {
            let headers = rdsys::rd_kafka_headers_new(record.headers.len());
            for (name, value) in &record.headers {
                let (v, n) = match value {
                    Some(v) => (v.as_ptr().cast::<c_void>(), v.len() as isize),
                    None => (std::ptr::null(), 0),
                };
                let err =
                    rdsys::rd_kafka_header_add(headers, name.as_ptr().cast::<c_char>(), name.len() as isize, v, n);
                assert_eq!(err, rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR);
            }
            let mut vus = vec![
                vu(V::RD_KAFKA_VTYPE_TOPIC, rdsys::rd_kafka_vu_s__bindgen_ty_1 { cstr: topic_c.as_ptr() }),
                vu(V::RD_KAFKA_VTYPE_PARTITION, rdsys::rd_kafka_vu_s__bindgen_ty_1 { i32_: record.partition }),
                vu(
                    V::RD_KAFKA_VTYPE_VALUE,
                    rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                        mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                            ptr: record.payload.as_ptr() as *mut c_void,
                            size: record.payload.len(),
                        },
                    },
                ),
                vu(V::RD_KAFKA_VTYPE_MSGFLAGS, rdsys::rd_kafka_vu_s__bindgen_ty_1 { i: rdsys::RD_KAFKA_MSG_F_COPY }),
                vu(V::RD_KAFKA_VTYPE_HEADERS, rdsys::rd_kafka_vu_s__bindgen_ty_1 { headers }),
            ];
            if let Some(key) = record.key {
                vus.push(vu(
                    V::RD_KAFKA_VTYPE_KEY,
                    rdsys::rd_kafka_vu_s__bindgen_ty_1 {
                        mem: rdsys::rd_kafka_vu_s__bindgen_ty_1__bindgen_ty_1 {
                            ptr: key.as_ptr() as *mut c_void,
                            size: key.len(),
                        },
                    },
                ));
            }
            let error = rdsys::rd_kafka_produceva(rk, vus.as_ptr(), vus.len());
            if !error.is_null() {
                let code = rdsys::rd_kafka_error_code(error);
                rdsys::rd_kafka_error_destroy(error);
                rdsys::rd_kafka_headers_destroy(headers);
                panic!("foreign produce to {topic}: {code:?}");
            }
        }
        self.producer.flush(Duration::from_secs(20)).expect("foreign producer flush");
    }
}
