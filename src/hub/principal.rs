//! Who a hub call acts for, and what it may touch.
//!
//! The caller's hub subject comes from its auth principal: with no auth configured it is the admin
//! `system`, with the shared token the admin `legacy-token`, otherwise its
//! [`Principal::qualified_id`] (`token:<name>`, `jwt:<sub>`, `jwt@<tenant>:<sub>`, `mtls:<id>`),
//! so a JWT tenant is part of the principal and a JWT `sub` never equals a token's name. A
//! requested principal that is empty or the caller's subject means the caller; any other needs an
//! admin. A conversation belongs to its principal: others are refused unless they are admins.
//! Readonly callers may read and follow conversations but not write.

use super::HubError;
use crate::auth::{AuthMethod, Principal, Role};
use crate::state::Conversation;

/// The caller of a hub operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Its hub subject; empty = none (the call is refused as unauthenticated).
    pub subject: String,
    /// Whether it may act for other principals and touch their conversations.
    pub admin: bool,
    /// Whether it may write (append, create conversations, bind).
    pub can_write: bool,
}

impl Caller {
    /// The hub caller of an authenticated principal (see the module docs).
    pub fn from_principal(p: &Principal) -> Self {
        let admin = p.role == Role::Admin;
        let subject = match p.method {
            AuthMethod::None if admin => "system".to_string(),
            // A call that was never admitted (the transport's read-only stand-in) has no subject.
            AuthMethod::None => String::new(),
            AuthMethod::Token if p.id == "legacy-token" => "legacy-token".to_string(),
            _ => p.qualified_id(),
        };
        Self {
            subject,
            admin,
            can_write: p.can_write(),
        }
    }

    /// The principal a request that names `requested` acts for.
    pub fn resolve(&self, requested: &str) -> Result<String, HubError> {
        if self.subject.is_empty() {
            return Err(HubError::Unauthenticated);
        }
        if requested.is_empty() || requested == self.subject {
            return Ok(self.subject.clone());
        }
        if self.admin {
            return Ok(requested.to_string());
        }
        Err(HubError::PermissionDenied(format!(
            "principal `{requested}` is not yours (you are `{}`); only admins act for other principals",
            self.subject
        )))
    }

    /// Refuses a caller that may not see `conv`.
    pub fn check_owner(&self, conv: &Conversation) -> Result<(), HubError> {
        self.check_owned_by(&conv.id, &conv.principal)
    }

    /// Refuses a caller that may not see conversation `conv_id` of `owner`.
    pub fn check_owned_by(&self, conv_id: &str, owner: &str) -> Result<(), HubError> {
        if self.subject.is_empty() {
            return Err(HubError::Unauthenticated);
        }
        if self.admin || owner == self.subject {
            return Ok(());
        }
        Err(HubError::PermissionDenied(format!(
            "conversation {conv_id} belongs to another principal"
        )))
    }

    /// Refuses a readonly caller; `what` says what it tried ("append events").
    pub fn require_write(&self, what: &str) -> Result<(), HubError> {
        if self.subject.is_empty() {
            return Err(HubError::Unauthenticated);
        }
        match self.can_write {
            true => Ok(()),
            false => Err(HubError::PermissionDenied(format!(
                "readonly principals cannot {what}"
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn principal(method: AuthMethod, id: &str, role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            id: id.into(),
            role,
            method,
            email: None,
            tenant_id: tenant.map(str::to_string),
        }
    }

    #[test]
    fn the_callers_subject_follows_its_auth() {
        use AuthMethod::*;
        use Role::*;
        let table = [
            // (method, id, role, tenant) → (subject, admin, can_write)
            (
                (None, "anonymous", Admin, Option::None),
                ("system", true, true),
            ),
            (
                (None, "anonymous", ReadOnly, Option::None),
                ("", false, false),
            ),
            (
                (Token, "legacy-token", Admin, Option::None),
                ("legacy-token", true, true),
            ),
            (
                (Token, "team-a", User, Option::None),
                ("token:team-a", false, true),
            ),
            (
                (Token, "ops", Admin, Option::None),
                ("token:ops", true, true),
            ),
            (
                (Token, "viewer", ReadOnly, Option::None),
                ("token:viewer", false, false),
            ),
            (
                (Jwt, "alice", User, Option::None),
                ("jwt:alice", false, true),
            ),
            (
                (Jwt, "alice", User, Some("acme")),
                ("jwt@acme:alice", false, true),
            ),
            (
                (Jwt, "alice", User, Some("other")),
                ("jwt@other:alice", false, true),
            ),
            (
                (Mtls, "client-1", Admin, Option::None),
                ("mtls:client-1", true, true),
            ),
        ];
        for ((method, id, role, tenant), (subject, admin, write)) in table {
            let c = Caller::from_principal(&principal(method, id, role, tenant));
            assert_eq!(
                (c.subject.as_str(), c.admin, c.can_write),
                (subject, admin, write),
                "{method:?} {id} {role:?} {tenant:?}"
            );
        }
    }

    #[test]
    fn a_requested_principal_is_the_callers_own_unless_an_admin_asks() {
        let user = Caller::from_principal(&principal(AuthMethod::Jwt, "alice", Role::User, None));
        let tenant = Caller::from_principal(&principal(
            AuthMethod::Jwt,
            "alice",
            Role::User,
            Some("acme"),
        ));
        let admin = Caller::from_principal(&principal(
            AuthMethod::Token,
            "legacy-token",
            Role::Admin,
            None,
        ));
        let system =
            Caller::from_principal(&principal(AuthMethod::None, "anonymous", Role::Admin, None));
        let nobody = Caller::from_principal(&principal(
            AuthMethod::None,
            "anonymous",
            Role::ReadOnly,
            None,
        ));
        // (caller, requested) → Ok(principal) or the error code.
        let table: [(&Caller, &str, Result<&str, &str>); 12] = [
            (&user, "", Ok("jwt:alice")),
            (&user, "jwt:alice", Ok("jwt:alice")),
            (&user, "jwt:bob", Err("permission_denied")),
            (&user, "alice", Err("permission_denied")),
            (&user, "jwt@acme:alice", Err("permission_denied")),
            (&tenant, "", Ok("jwt@acme:alice")),
            (&tenant, "jwt:alice", Err("permission_denied")),
            (&admin, "", Ok("legacy-token")),
            (&admin, "jwt:bob", Ok("jwt:bob")),
            (&system, "", Ok("system")),
            (&system, "telegram-user", Ok("telegram-user")),
            (&nobody, "", Err("unauthenticated")),
        ];
        for (caller, requested, want) in table {
            let got = caller.resolve(requested);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(w, g, "{caller:?} {requested}"),
                (Err(code), Err(e)) => assert_eq!(code, e.code(), "{caller:?} {requested}: {e}"),
                (w, g) => panic!("{caller:?} asking for {requested:?}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn conversations_belong_to_their_principal_and_admins_bypass() {
        let conv = |owner: &str| Conversation {
            id: "c1".into(),
            principal: owner.into(),
            created_ms: 0,
            updated_ms: 0,
            last_seq: 0,
        };
        let user = Caller::from_principal(&principal(AuthMethod::Jwt, "alice", Role::User, None));
        let reader = Caller::from_principal(&principal(
            AuthMethod::Token,
            "viewer",
            Role::ReadOnly,
            None,
        ));
        let admin = Caller::from_principal(&principal(
            AuthMethod::Token,
            "legacy-token",
            Role::Admin,
            None,
        ));
        let table: [(&Caller, &str, Option<&str>); 6] = [
            (&user, "jwt:alice", None),
            (&user, "jwt:bob", Some("permission_denied")),
            (&user, "jwt@acme:alice", Some("permission_denied")),
            (&admin, "jwt:bob", None),
            (&reader, "token:viewer", None),
            (&reader, "jwt:alice", Some("permission_denied")),
        ];
        for (caller, owner, want) in table {
            let got = caller.check_owner(&conv(owner)).err().map(|e| e.code());
            assert_eq!(got, want, "{caller:?} on a conversation of {owner}");
        }
        assert_eq!(user.require_write("append events"), Ok(()));
        let refused = reader.require_write("append events").unwrap_err();
        assert_eq!(refused.code(), "permission_denied");
        assert!(refused.to_string().contains("readonly"), "{refused}");
    }
}
