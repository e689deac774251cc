//! The body of an answer keygate makes itself (a refusal, a preflight), and the part of a
//! refusal's head that every refusal of its kind shares.
//!
//! A refusal flood is the one load keygate answers entirely by itself, so a refusal's head is
//! the one worth not building anew for each request. Its fixed fields (`content-type`,
//! `cache-control`, `www-authenticate`) and its request id travel beside the response's header
//! map rather than in it: keygate's HTTP/1 server writes them from bytes rendered once per kind
//! of refusal, and for hyper (HTTP/2, and the HTTP/1 connections hyper serves) [`settle`] puts
//! them into the map. Either way the client gets the same fields.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, SizeHint};

use super::forward::X_REQUEST_ID;
use super::h1::put_field;

/// Header fields shared by every refusal of one kind, and the same fields as HTTP/1 lines.
#[derive(Debug)]
pub struct Fixed {
    fields: HeaderMap,
    lines: Vec<u8>,
}

impl Fixed {
    /// `fields` must hold none that a server decides itself (framing, `connection`, `date`,
    /// `trailer`): keygate's HTTP/1 server writes these lines as they are.
    pub fn new(fields: HeaderMap) -> Self {
        let mut lines = Vec::new();
        for (name, value) in &fields {
            put_field(&mut lines, name, value);
        }
        Self { fields, lines }
    }
}

/// The body of an answer keygate makes itself: whole, and small.
#[derive(Debug)]
pub struct Reply {
    data: Full<Bytes>,
    /// A refusal's fixed fields and request id, while they are not in the response's map.
    apart: Option<(&'static Fixed, HeaderValue)>,
}

impl Reply {
    /// A refusal's body, its fixed fields and request id held beside it.
    pub fn refusal(data: Bytes, fixed: &'static Fixed, request_id: HeaderValue) -> Self {
        Self { data: Full::new(data), apart: Some((fixed, request_id)) }
    }

    /// The fields held apart, for a server writing the head itself: the request id, then the
    /// fixed fields as HTTP/1 lines.
    pub fn apart(&self) -> Option<(&HeaderValue, &[u8])> {
        self.apart.as_ref().map(|(fixed, id)| (id, fixed.lines.as_slice()))
    }
}

impl From<Full<Bytes>> for Reply {
    fn from(data: Full<Bytes>) -> Self {
        Self { data, apart: None }
    }
}

impl Body for Reply {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().data).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.data.size_hint()
    }
}

/// Puts the fields a reply holds apart into its response's map, for a server that writes the
/// head from the map alone (hyper). Any other response is left as it is.
pub fn settle<B>(response: &mut Response<Either<B, Reply>>) {
    let Either::Right(reply) = response.body_mut() else { return };
    let Some((fixed, request_id)) = reply.apart.take() else { return };
    let headers = response.headers_mut();
    headers.reserve(fixed.fields.len() + 1);
    headers.insert(X_REQUEST_ID, request_id);
    for (name, value) in &fixed.fields {
        headers.insert(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn settled_fields_are_the_lines_written_apart() {
        let mut fields = HeaderMap::new();
        fields.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        fields.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        let fixed: &'static Fixed = Box::leak(Box::new(Fixed::new(fields)));
        let reply = Reply::refusal(Bytes::from_static(b"{}"), fixed, HeaderValue::from_static("id-9"));
        let (id, lines) = reply.apart().unwrap();
        assert_eq!(id, "id-9");
        assert_eq!(lines, b"content-type: application/json\r\ncache-control: no-store\r\n");

        let mut response: Response<Either<(), Reply>> = Response::new(Either::Right(reply));
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        settle(&mut response);
        let headers = response.headers();
        assert_eq!(headers.len(), 4);
        assert_eq!(headers[X_REQUEST_ID], "id-9");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(headers[header::RETRY_AFTER], "3");
        let Either::Right(reply) = response.body() else { unreachable!() };
        assert!(reply.apart().is_none(), "settled fields are not written twice");
    }
}
