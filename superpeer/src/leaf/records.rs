//! The record calls of the Leaf service: put, get, delete, list and search, each checked against limits,
//! ownership and the namespace's ACL on this replica before anything is proposed.

use super::convert;
use super::{consistency, unexpected, LeafService};
use crate::command::StoredRecord;
use crate::command::{
    may_read, DeleteRecord, Op, PutRecord, RecordQuota, Rejection, Response as CommandResponse,
    TraceContext,
};
use crate::error::ServiceError;
use crate::store::records;
use crate::store::{blocking, StoreError};
use tonic::{Request, Response, Status};
use vesper_proto::search;
use vesper_proto::v1::{
    DeleteRecordRequest, DeleteRecordResponse, GetRecordRequest, GetRecordResponse,
    ListRecordsRequest, ListRecordsResponse, PutRecordRequest, PutRecordResponse,
    SearchRecordsRequest, SearchRecordsResponse,
};
use vesper_proto::{validate, PeerId};

/// What list and search share: where, how many, from where, how consistent.
struct PageRequest {
    /// The peer reading, for the namespace's ACL.
    reader: crate::command::PeerKey,
    namespace: String,
    limit: u32,
    page_token: String,
    consistency: i32,
}

impl LeafService {
    /// Validates a page request, waits for the read's consistency, runs `query` off the async threads and
    /// converts the page. Returns (records, next page token, applied index).
    async fn read_page(
        &self,
        page: PageRequest,
        query: impl FnOnce(
                &rocksdb::DB,
                &str,
                Option<&str>,
                usize,
            ) -> Result<(Vec<(String, StoredRecord)>, bool), StoreError>
            + Send
            + 'static,
    ) -> Result<(Vec<vesper_proto::v1::Record>, String, u64), ServiceError> {
        validate::namespace(&page.namespace)?;
        let limit = validate::page_limit(page.limit)? as usize;
        let applied_index = self
            .context
            .replica
            .read_barrier(consistency(page.consistency)?)
            .await?;
        let reader = self.context.replica.reader().clone();
        let namespace = page.namespace.clone();
        let after = (!page.page_token.is_empty()).then_some(page.page_token);
        let peer = page.reader;
        let (found, more) = blocking(move || {
            let db = reader.db();
            if !may_read(records::acl(db, &namespace)?.as_ref(), &peer) {
                return Ok(Err(Rejection::NamespaceRead(namespace)));
            }
            query(db, &namespace, after.as_deref(), limit).map(Ok)
        })
        .await??;
        let (records, next_page_token) = convert::page(&page.namespace, found, more);
        Ok((records, next_page_token, applied_index))
    }

    /// Checks the namespace ACL, ownership, compare-and-set and, for a put of `put_size` bytes, the owner's
    /// index quota against the local replica before anything is proposed. Returns whether the record exists.
    async fn precheck(
        &self,
        peer: &PeerId,
        namespace: &str,
        key: &str,
        expected_version: Option<u64>,
        put_size: Option<(u64, RecordQuota)>,
    ) -> Result<bool, ServiceError> {
        let reader = self.context.replica.reader().clone();
        let (owned_namespace, owned_key) = (namespace.to_string(), key.to_string());
        let writer = *peer.as_bytes();
        let (current, acl, usage) = blocking(move || {
            let db = reader.db();
            let current = records::get(db, &owned_namespace, &owned_key)?;
            // The creator is charged for its record, also when a group member writes it.
            let owner = current.as_ref().map_or(writer, |record| record.owner);
            Ok((
                current,
                records::acl(db, &owned_namespace)?,
                records::usage(db, &owner)?,
            ))
        })
        .await?;
        records::check_write(
            current.as_ref(),
            peer.as_bytes(),
            expected_version,
            namespace,
            acl.as_ref(),
        )?;
        if let Some((size, quota)) = put_size {
            let old_size = current.as_ref().map(|record| {
                records::record_size(namespace, key, &record.attributes, record.value.len())
            });
            records::charge(usage, old_size, size, quota)?;
        }
        Ok(current.is_some())
    }
}

/// `Leaf.PutRecord`.
pub(super) async fn put_record(
    service: &LeafService,
    request: Request<PutRecordRequest>,
) -> Result<Response<PutRecordResponse>, Status> {
    let peer = service.authenticate(&request)?;
    let request = request.into_inner();
    validate::record(
        &service.context.config.limits,
        &request.namespace,
        &request.key,
        &request.attributes,
        &request.value,
    )
    .map_err(ServiceError::from)?;
    let size = records::record_size(
        &request.namespace,
        &request.key,
        &request.attributes,
        request.value.len(),
    );
    let quota = RecordQuota {
        records: service.context.config.max_records_per_peer,
        bytes: service.context.config.max_record_bytes_per_peer,
    };
    service
        .precheck(
            &peer,
            &request.namespace,
            &request.key,
            request.expected_version,
            Some((size, quota)),
        )
        .await?;
    let op: Op = PutRecord {
        owner: *peer.as_bytes(),
        namespace: request.namespace.clone(),
        key: request.key.clone(),
        attributes: request.attributes.into_iter().collect(),
        value: request.value,
        expected_version: request.expected_version,
        quota,
    }
    .into();
    // Inside a sampled call (the `rpc.server` span of `LeafService`), the command carries the trace on.
    let op = op.traced(TraceContext::of(&tracing::Span::current()));
    match service.context.replica.propose_accepted(op).await? {
        (CommandResponse::Record(record), applied_index) => Ok(Response::new(PutRecordResponse {
            record: Some(convert::record(&request.namespace, &request.key, record)),
            applied_index,
        })),
        (other, _) => Err(unexpected(other)),
    }
}

/// `Leaf.GetRecord`.
pub(super) async fn get_record(
    service: &LeafService,
    request: Request<GetRecordRequest>,
) -> Result<Response<GetRecordResponse>, Status> {
    let peer = service.authenticate(&request)?;
    let request = request.into_inner();
    validate::namespace(&request.namespace).map_err(ServiceError::from)?;
    validate::key(&request.key).map_err(ServiceError::from)?;
    let applied_index = service
        .context
        .replica
        .read_barrier(consistency(request.consistency)?)
        .await?;
    let reader = service.context.replica.reader().clone();
    let (namespace, key) = (request.namespace.clone(), request.key.clone());
    let record = blocking(move || {
        let db = reader.db();
        if !may_read(records::acl(db, &namespace)?.as_ref(), peer.as_bytes()) {
            return Ok(Err(Rejection::NamespaceRead(namespace)));
        }
        records::get(db, &namespace, &key).map(Ok)
    })
    .await
    .map_err(ServiceError::from)?
    .map_err(ServiceError::from)?;
    Ok(Response::new(GetRecordResponse {
        record: record.map(|record| convert::record(&request.namespace, &request.key, record)),
        applied_index,
    }))
}

/// `Leaf.DeleteRecord`.
pub(super) async fn delete_record(
    service: &LeafService,
    request: Request<DeleteRecordRequest>,
) -> Result<Response<DeleteRecordResponse>, Status> {
    let peer = service.authenticate(&request)?;
    let request = request.into_inner();
    validate::namespace(&request.namespace).map_err(ServiceError::from)?;
    validate::key(&request.key).map_err(ServiceError::from)?;
    let exists = service
        .precheck(
            &peer,
            &request.namespace,
            &request.key,
            request.expected_version,
            None,
        )
        .await?;
    if !exists && request.expected_version.is_none() {
        // Nothing to delete: answer without a Raft round.
        return Ok(Response::new(DeleteRecordResponse {
            deleted: false,
            applied_index: 0,
        }));
    }
    let op: Op = DeleteRecord {
        owner: *peer.as_bytes(),
        namespace: request.namespace,
        key: request.key,
        expected_version: request.expected_version,
    }
    .into();
    let op = op.traced(TraceContext::of(&tracing::Span::current()));
    match service.context.replica.propose_accepted(op).await? {
        (CommandResponse::Deleted(deleted), applied_index) => {
            Ok(Response::new(DeleteRecordResponse {
                deleted,
                applied_index,
            }))
        }
        (other, _) => Err(unexpected(other)),
    }
}

/// `Leaf.ListRecords`.
pub(super) async fn list_records(
    service: &LeafService,
    request: Request<ListRecordsRequest>,
) -> Result<Response<ListRecordsResponse>, Status> {
    let peer = service.authenticate(&request)?;
    let request = request.into_inner();
    validate::key_prefix(&request.key_prefix).map_err(ServiceError::from)?;
    let prefix = request.key_prefix;
    let page = PageRequest {
        reader: *peer.as_bytes(),
        namespace: request.namespace,
        limit: request.limit,
        page_token: request.page_token,
        consistency: request.consistency,
    };
    let (records, next_page_token, applied_index) = service
        .read_page(page, move |db, namespace, after, limit| {
            records::list(
                db,
                namespace,
                &prefix,
                after,
                limit,
                validate::MAX_PAGE_BYTES,
            )
        })
        .await?;
    Ok(Response::new(ListRecordsResponse {
        records,
        next_page_token,
        applied_index,
    }))
}

/// `Leaf.SearchRecords`.
pub(super) async fn search_records(
    service: &LeafService,
    request: Request<SearchRecordsRequest>,
) -> Result<Response<SearchRecordsResponse>, Status> {
    let peer = service.authenticate(&request)?;
    let request = request.into_inner();
    let terms = search::terms(&request.terms).map_err(ServiceError::from)?;
    let page = PageRequest {
        reader: *peer.as_bytes(),
        namespace: request.namespace,
        limit: request.limit,
        page_token: request.page_token,
        consistency: request.consistency,
    };
    let (records, next_page_token, applied_index) = service
        .read_page(page, move |db, namespace, after, limit| {
            records::search(
                db,
                namespace,
                &terms,
                after,
                limit,
                validate::MAX_PAGE_BYTES,
            )
        })
        .await?;
    Ok(Response::new(SearchRecordsResponse {
        records,
        next_page_token,
        applied_index,
    }))
}
