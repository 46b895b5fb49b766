// Dynamics Companion on Azure Functions Flex Consumption: the function app (custom
// handler runtime), its user-assigned managed identity, Key Vault (RBAC), storage used
// through the identity only (no account key), Application Insights, and the product's
// app settings. `azd up` (azure.yaml) provisions this and deploys dist/dynamics-companion.zip.
//
// Shapes follow Azure-Samples/azure-functions-flex-consumption-samples IaC/bicep/main.bicep
// and rbac.bicep, and MicrosoftDocs/azure-docs articles/azure-functions/flex-consumption-plan.md
// (see ../README.md "Deploy"). Checked here by a Bicep grammar parse only; see
// scripts/check-infra for what is and is not validated.

targetScope = 'resourceGroup'

@description('Name of the azd environment; names the resources.')
@minLength(1)
@maxLength(32)
param environmentName string

@description('Region; Flex Consumption is offered in a subset of regions.')
param location string = resourceGroup().location

@description('The Dataverse environment, https://org.crm.dynamics.com (STORE=dataverse).')
param dataverseUrl string

@description('Publisher prefix of the product tables in Dataverse.')
param dataversePrefix string = 'dc'

@description('OIDC issuer of back-office callers, https://login.microsoftonline.com/{tenant}/v2.0; empty keeps the back-office API closed.')
param authIssuer string = ''

@description('Accepted audiences of back-office tokens, comma-separated.')
param authAudience string = ''

@description('Back-office callers (azp/appid) allowed, comma-separated.')
param authAllowedClientIds string = ''

@description('Largest number of instances the app scales out to. Each instance sends Dataverse at most DATAVERSE_MAX_CONCURRENCY requests at once; all share the application user\'s 52.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 3

@description('Instance memory: 512, 2048 or 4096 MB (flex-consumption-plan.md). The handler idles at about 13 MiB.')
@allowed([512, 2048, 4096])
param instanceMemoryMB int = 512

@description('Requests one instance sends Dataverse at once.')
@minValue(1)
@maxValue(52)
param dataverseMaxConcurrency int = 16

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var prefix = take(toLower(replace(environmentName, '_', '-')), 16)
var appName = '${prefix}-dc-${token}'
var tags = { 'azd-env-name': environmentName }
var deploymentContainer = 'app-package'

// Built-in role ids (IaC/bicep/rbac.bicep of the Flex samples; Key Vault Secrets User from
// learn.microsoft.com/azure/role-based-access-control/built-in-roles).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: 'id-${appName}'
  location: location
  tags: tags
}

// Storage for the host (timer leases, keys) and the deployment package. Shared keys off:
// the app reaches it with its identity only (AzureWebJobsStorage__credential below).
resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: take('st${replace(prefix, '-', '')}${token}', 24)
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    dnsEndpointType: 'Standard'
    publicNetworkAccess: 'Enabled'
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

// Flex runs the app from the zip in this container ("one deploy").
resource packageContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainer
  properties: { publicAccess: 'None' }
}

resource logs 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: 'log-${appName}'
  location: location
  tags: tags
  properties: {
    sku: { name: 'PerGB2018' }
    retentionInDays: 30
  }
}

// Local (key) authentication off: telemetry is sent with the identity
// (APPLICATIONINSIGHTS_AUTHENTICATION_STRING below, Monitoring Metrics Publisher role).
resource insights 'Microsoft.Insights/components@2020-02-02' = {
  name: 'appi-${appName}'
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logs.id
    DisableLocalAuth: true
  }
}

// Secrets (provider client secrets, token-encryption-keys) live here; the app reads them
// with azure_security_keyvault_secrets through its identity. RBAC, not access policies.
resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: take('kv-${replace(prefix, '-', '')}-${token}', 24)
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
  }
}

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: 'plan-${appName}'
  location: location
  tags: tags
  kind: 'functionapp'
  sku: { name: 'FC1', tier: 'FlexConsumption' }
  properties: { reserved: true }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: appName
  location: location
  tags: union(tags, { 'azd-service-name': 'companion' })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: { '${identity.id}': {} }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      // Flex refuses the FUNCTIONS_WORKER_RUNTIME app setting; the runtime is declared
      // here. 'custom' is what the public Flex custom-handler samples use (not yet in the
      // documented stack table; deploy-and-connect.md §2).
      runtime: { name: 'custom', version: '1.0' }
    }
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
    }
  }
}

// App settings as a child resource, so PUBLIC_BASE_URL can use the app's host name.
resource settings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: app
  name: 'appsettings'
  properties: {
    // The host's storage, through the identity (no connection string).
    AzureWebJobsStorage__accountName: storage.name
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identity.properties.clientId
    APPLICATIONINSIGHTS_CONNECTION_STRING: insights.properties.ConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
    // The product (README "Configuration").
    PUBLIC_BASE_URL: 'https://${app.properties.defaultHostName}'
    AZURE_CREDENTIAL: 'managed_identity'
    AZURE_CLIENT_ID: identity.properties.clientId
    KEY_VAULT_URL: vault.properties.vaultUri
    STORE: 'dataverse'
    DATAVERSE_URL: dataverseUrl
    DATAVERSE_PREFIX: dataversePrefix
    DATAVERSE_MAX_CONCURRENCY: string(dataverseMaxConcurrency)
    AUTH_ISSUER: authIssuer
    AUTH_AUDIENCE: authAudience
    AUTH_ALLOWED_CLIENT_IDS: authAllowedClientIds
    LOG_LEVEL: 'info'
  }
}

resource blobOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, roles.storageBlobDataOwner)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageBlobDataOwner)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource queueContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, roles.storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageQueueDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource tableContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, roles.storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.storageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource metricsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(insights.id, identity.id, roles.monitoringMetricsPublisher)
  scope: insights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource secretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vault.id, identity.id, roles.keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// azd reads these as environment values (AZURE_FUNCTION_APP_NAME, ...).
output AZURE_FUNCTION_APP_NAME string = app.name
output AZURE_RESOURCE_GROUP string = resourceGroup().name
output SERVICE_URL string = 'https://${app.properties.defaultHostName}'
output REDIRECT_URI string = 'https://${app.properties.defaultHostName}/api/oauth/callback'
output KEY_VAULT_NAME string = vault.name
output IDENTITY_CLIENT_ID string = identity.properties.clientId
output IDENTITY_PRINCIPAL_ID string = identity.properties.principalId
