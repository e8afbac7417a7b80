//! One configured call, made from JSON: the method is looked up in engram's own descriptors
//! (the same ones the server's reflection serves), each request's JSON becomes the method's
//! input message, and the call goes out over tonic with the bytes as they are.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf as _, BufMut as _};
use engram_proto::tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use engram_proto::tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue, MetadataMap};
use engram_proto::tonic::transport::Channel;
use engram_proto::tonic::{Request, Status};
use http::uri::PathAndQuery;
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use serde_json::Value;

/// A method to call, resolved.
#[derive(Debug, Clone)]
pub struct Method {
    path: PathAndQuery,
    input: MessageDescriptor,
    metadata: MetadataMap,
}

impl Method {
    /// Resolve `call` (`package.Service.Method` or `package.Service/Method`) among engram's
    /// services.
    pub fn resolve(call: &str, metadata: &BTreeMap<String, String>) -> Result<Self, String> {
        let pool = DescriptorPool::decode(engram_proto::FILE_DESCRIPTOR_SET)
            .map_err(|e| format!("engram's descriptors: {e}"))?;
        let (service, method) = call
            .rsplit_once('/')
            .or_else(|| call.rsplit_once('.'))
            .ok_or_else(|| format!("call {call:?}: expected package.Service.Method"))?;
        let descriptor = pool
            .get_service_by_name(service)
            .ok_or_else(|| format!("call {call:?}: no service {service:?}"))?;
        let found = descriptor
            .methods()
            .find(|m| m.name() == method)
            .ok_or_else(|| format!("call {call:?}: {service} has no method {method:?}"))?;
        if found.is_client_streaming() || found.is_server_streaming() {
            return Err(format!("call {call:?}: only unary methods can be run"));
        }
        let path = format!("/{service}/{method}")
            .parse()
            .map_err(|e| format!("call {call:?}: {e}"))?;
        let mut map = MetadataMap::new();
        for (key, value) in metadata {
            let name: AsciiMetadataKey = key
                .parse()
                .map_err(|_| format!("metadata: {key:?} is not a valid key"))?;
            let value: AsciiMetadataValue = value
                .parse()
                .map_err(|_| format!("metadata {key}: not a valid ASCII value"))?;
            map.insert(name, value);
        }
        Ok(Self {
            path,
            input: found.input(),
            metadata: map,
        })
    }

    /// `json` as the method's input message, encoded.
    pub fn encode(&self, json: &Value) -> Result<Vec<u8>, String> {
        let message = DynamicMessage::deserialize(self.input.clone(), json)
            .map_err(|e| format!("data does not fit {}: {e}", self.input.full_name()))?;
        Ok(message.encode_to_vec())
    }

    /// Make the call on `channel` with the encoded request.
    pub async fn call(
        &self,
        channel: Channel,
        body: Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<(), Status> {
        let mut grpc = engram_proto::tonic::client::Grpc::new(channel);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let mut request = Request::new(body);
        *request.metadata_mut() = self.metadata.clone();
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        grpc.unary::<_, Vec<u8>, _>(request, self.path.clone(), Raw)
            .await
            .map(|_| ())
    }
}

/// Messages as bytes: encoded by [`Method::encode`], answers not decoded.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Self::Encoder {
        Raw
    }

    fn decoder(&mut self) -> Self::Decoder {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        Ok(Some(bytes.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_resolve_and_json_becomes_their_input() {
        let method = Method::resolve("engram.v1.MemoryService.Recall", &BTreeMap::new()).unwrap();
        let bytes = method
            .encode(&serde_json::json!({"scope": {"userId": "u"}, "query": "q", "topK": 3, "mode": "SEARCH_MODE_KEYWORD"}))
            .unwrap();
        let decoded = engram_proto::v1::RecallRequest::decode(bytes.as_slice()).unwrap();
        assert_eq!(decoded.query, "q");
        assert_eq!(decoded.top_k, 3);
        assert_eq!(decoded.scope.unwrap().user_id, "u");
        assert!(Method::resolve("engram.v1.MemoryService/Recall", &BTreeMap::new()).is_ok());
        for bad in [
            "Recall",
            "engram.v1.Nope.Recall",
            "engram.v1.MemoryService.Nope",
        ] {
            assert!(Method::resolve(bad, &BTreeMap::new()).is_err(), "{bad}");
        }
        let error = method
            .encode(&serde_json::json!({"topK": "many"}))
            .unwrap_err();
        assert!(error.contains("RecallRequest"), "{error}");
    }
}
