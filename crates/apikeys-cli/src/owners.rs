//! `apikeys owners …`: the plans (shared limits and credits) of owners.

use apikeys_db::{ApiKeyClient, Credits, Owner, OwnerPlan, Page};
use serde_json::json;

use crate::args::OwnersCommand;
use crate::failure::Failure;
use crate::keys::named_limits;
use crate::output::{Out, credits_text, limits_text, print_line, table, when};
use crate::records;

/// Runs one `owners` command.
pub async fn run(client: &ApiKeyClient, command: OwnersCommand, out: &Out) -> Result<(), Failure> {
    match command {
        OwnersCommand::Set { owner, org, limits, credits, refill } => {
            let org = records::org(client, &org).await?;
            let mut plan = OwnerPlan::new().with_rate_limits(named_limits(limits)?);
            if let Some(n) = credits {
                let credits = Credits::new(n);
                plan = plan.with_credits(match refill {
                    Some(r) => credits.with_refill(r),
                    None => credits,
                });
            }
            show(out, &client.set_owner(org.id, &owner, plan).await?)
        }
        OwnersCommand::Limits { owner, org, limits } => {
            let org = records::org(client, &org).await?;
            show(out, &client.set_owner_limits(org.id, &owner, named_limits(limits)?).await?)
        }
        OwnersCommand::Show { owner, org } => {
            let org = records::org(client, &org).await?;
            show(out, &client.get_owner(org.id, &owner).await.map_err(no_plan)?)
        }
        OwnersCommand::List { org } => {
            let org = records::org(client, &org).await?;
            let mut all = Vec::new();
            let mut page = Page::first(1000)?;
            loop {
                let listed = client.list_owners_page(org.id, page).await?;
                all.extend(listed.items);
                match listed.next {
                    Some(next) => page = Page::first(1000)?.after(next),
                    None => break,
                }
            }
            if out.json {
                return out.json_value(&all);
            }
            let mut t = table(&["owner", "limits", "credits", "updated"]);
            for o in &all {
                t.add_row(vec![
                    o.owner_id.clone(),
                    limits_text(&o.rate_limits),
                    credits_text(o.credits),
                    when(Some(o.updated_at)),
                ]);
            }
            out.table(&t)
        }
        OwnersCommand::AddCredits { owner, org, amount } => {
            if amount == 0 {
                return Err(Failure::invalid("invalid AMOUNT: add at least 1 credit"));
            }
            let org = records::org(client, &org).await?;
            let topped = client.add_owner_credits(org.id, &owner, amount).await.map_err(no_plan)?;
            show(out, &topped)
        }
        OwnersCommand::Delete { owner, org } => {
            let org = records::org(client, &org).await?;
            client.delete_owner(org.id, &owner).await.map_err(no_plan)?;
            if out.json {
                return out.json_value(&json!({ "deleted": owner }));
            }
            print_line("deleted the owner's plan; its keys stay")
        }
    }
}

/// An owner with no plan is named as such, not by the plan's record id.
fn no_plan(e: apikeys_db::Error) -> Failure {
    match e {
        apikeys_db::Error::NotFound { id: apikeys_db::RecordId::Owner(_) } => Failure::invalid(
            "that owner has no plan in this organization (set one with `owners set`)",
        ),
        other => Failure::from(other),
    }
}

/// One plan, field by field.
fn show(out: &Out, o: &Owner) -> Result<(), Failure> {
    if out.json {
        return out.json_value(o);
    }
    let mut t = table(&["field", "value"]);
    let rows = [
        ("owner", o.owner_id.clone()),
        ("organization", o.org_id.to_string()),
        ("shared limits", limits_text(&o.rate_limits)),
        ("shared credits", credits_text(o.credits)),
        ("created", when(Some(o.created_at))),
        ("updated", when(Some(o.updated_at))),
    ];
    for (field, value) in rows {
        t.add_row(vec![field.to_owned(), value]);
    }
    out.table(&t)
}
