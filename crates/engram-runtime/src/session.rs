//! A session's conversation turns read back from the index, which keeps them for good: the
//! gateway rebuilds a session's cached history from here, and ingestion finds the turn before
//! a new one (the context it is embedded with) and the turn after a changed or forgotten one.
//!
//! Ids are time-ordered, so a listing can start at a time: the hour before the point of
//! interest first, widening to a day, 30 days and everything until enough turns are found.

use std::time::Duration;

use engram_domain::Result;
use engram_domain::api::{Index, ListQuery};
use engram_domain::model::{Filter, Kind, Memory, MemoryId, Scope, TenantId, Timestamp};

const WINDOWS: [Option<Duration>; 4] = [
    Some(Duration::from_secs(3600)),
    Some(Duration::from_secs(24 * 3600)),
    Some(Duration::from_secs(30 * 24 * 3600)),
    None,
];

/// Turns listed per call.
const PAGE: u32 = 1000;

/// The session a turn belongs to, as a read scope: its user and session, any agent.
pub fn session_of(scope: &Scope) -> Scope {
    Scope {
        user_id: scope.user_id.clone(),
        agent_id: String::new(),
        session_id: scope.session_id.clone(),
    }
}

fn listing(session: &Scope, page_size: u32, page_token: Option<MemoryId>) -> ListQuery {
    ListQuery {
        scope: session.clone(),
        filter: Filter {
            kinds: vec![Kind::Message],
            ..Filter::default()
        },
        page_size,
        page_token,
        after_write_token: None,
    }
}

/// Up to `keep` turns of `session` made before `before` (before now when `None`), oldest
/// first.
pub async fn turns_before(
    index: &dyn Index,
    tenant: &TenantId,
    session: &Scope,
    before: Option<MemoryId>,
    keep: usize,
) -> Result<Vec<Memory>> {
    if keep == 0 {
        return Ok(Vec::new());
    }
    let end_ms = before
        .and_then(|id| id.unix_ms())
        .unwrap_or_else(|| (Timestamp::now().as_micros() / 1000).max(0) as u64);
    let mut turns: Vec<Memory> = Vec::new();
    for window in WINDOWS {
        let mut page_token =
            window.map(|w| MemoryId::first_at(end_ms.saturating_sub(w.as_millis() as u64)));
        turns.clear();
        loop {
            let page = index
                .list(tenant, listing(session, PAGE, page_token))
                .await?;
            let listed = page.memories.len();
            let kept = turns.len();
            turns.extend(
                page.memories
                    .into_iter()
                    .take_while(|m| before.is_none_or(|b| m.id < b)),
            );
            let reached_end = turns.len() - kept < listed || page.next_page_token.is_none();
            if turns.len() > keep {
                turns.drain(..turns.len() - keep);
            }
            if reached_end {
                break;
            }
            page_token = page.next_page_token;
        }
        if turns.len() >= keep {
            break;
        }
    }
    Ok(turns)
}

/// The first turn of `session` made after `after`, if any.
pub async fn turn_after(
    index: &dyn Index,
    tenant: &TenantId,
    session: &Scope,
    after: MemoryId,
) -> Result<Option<Memory>> {
    let mut page_token = Some(after);
    loop {
        let page = index.list(tenant, listing(session, 8, page_token)).await?;
        if let Some(next) = page.memories.into_iter().find(|m| m.id > after) {
            return Ok(Some(next));
        }
        match page.next_page_token {
            Some(token) => page_token = Some(token),
            None => return Ok(None),
        }
    }
}
